"""Environments off the main process: each episode steps an environment held by a Ray actor.

ALFWorld's Python engine or a sandbox's start-up would otherwise serialise behind one interpreter while the
student's engine waits for the next step. `RayEpisodes(env)` stands where a compile clones its environment
for an episode: `clone()` lends one of `workers` actors (worker processes, on this machine or a Ray cluster),
each holding its own instance of the environment; the episode's `reset`/`step`/`privileged_state`/
`oracle_action` calls go there, and `close()` gives the actor back. Ray is imported only when this is used.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any

from leap_dspy.envs import env_class, env_spec
from leap_dspy.envs.base import TextEnv
from leap_dspy.types import Observation, PrivilegedState, Task


class _EnvActor:
    """Holds one environment in a worker process (a Ray actor class once wrapped by `ray.remote`)."""

    def __init__(self, spec: str, config: dict[str, Any]) -> None:
        self.env = env_class(spec)(**config)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.env, method)(*args)


class RayEpisodes:
    """A pool of Ray actors, each an instance of `env`, lent one per episode (`clone`)."""

    def __init__(self, env: TextEnv, address: str = "local", workers: int | None = None) -> None:
        import ray

        self.env, self.spec = env, env_spec(env)
        if not ray.is_initialized():
            # `local` starts Ray on this machine; anything else is a cluster address (`auto`: the running one).
            # The workers import the environment's module from this process's working directory, as it does.
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [
                         os.getcwd(), os.environ.get("PYTHONPATH", "")]))}})
        self._ray = ray
        self._actor_class = ray.remote(num_cpus=0)(_EnvActor)  # env steps are light: do not reserve a core each
        self.workers = workers or int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        self._free: queue.Queue[Any] = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def clone(self) -> RemoteEnv:
        """An episode's environment: a free actor, or a new one while fewer than `workers` exist."""
        with self._lock:
            if self._free.empty() and self._made < self.workers:
                self._made += 1
                self._free.put(self._actor_class.remote(self.spec, self.env.config()))
        return RemoteEnv(self, self._free.get())

    def give_back(self, actor: Any) -> None:
        self._free.put(actor)

    def replace(self, dead: Any) -> Any:
        """A fresh actor in place of one whose worker died (killed, OOM, a lost node): a dead actor is never lent
        again, or every later episode it is lent to would fail at its reset."""
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(dead)
        return self._actor_class.remote(self.spec, self.env.config())

    def shutdown(self) -> None:
        while not self._free.empty():
            self._ray.kill(self._free.get())
        self._made = 0


class RemoteEnv:
    """The environment of one episode, in an actor: the calls an episode makes, forwarded."""

    def __init__(self, pool: RayEpisodes, actor: Any) -> None:
        self.pool, self.actor = pool, actor
        self.max_steps = getattr(pool.env, "max_steps", 30)
        self._task: Task | None = None
        self._actions: list[str] = []  # the episode so far, replayed on a fresh actor if this one dies

    def _call(self, method: str, *args: Any) -> Any:
        ray = self.pool._ray
        try:
            try:
                return ray.get(self.actor.call.remote(method, *args))
            except ray.exceptions.RayActorError:
                # The worker died, not the environment. Replay the episode so far on a fresh actor (episodes are
                # reproducible from the task and the actions) and retry once.
                self.actor = self.pool.replace(self.actor)
                if self._task is not None and method != "reset":
                    ray.get(self.actor.call.remote("reset", self._task))
                    for action in self._actions:
                        ray.get(self.actor.call.remote("step", action))
                return ray.get(self.actor.call.remote(method, *args))
        except ray.exceptions.RayTaskError as exc:  # the environment's own exception, as it would be raised here
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise

    def reset(self, task: Task) -> Observation:
        self._task, self._actions = task, []
        return self._call("reset", task)

    def step(self, action: str) -> Observation:
        observation = self._call("step", action)
        self._actions.append(action)
        return observation

    def privileged_state(self, level: int) -> PrivilegedState:
        return self._call("privileged_state", level)

    def oracle_action(self) -> str | None:
        return self._call("oracle_action")

    def close(self) -> None:
        try:
            self.pool._ray.get(self.actor.call.remote("close"))
        except self.pool._ray.exceptions.RayActorError:  # died after its episode: lend a fresh one instead
            self.actor = self.pool.replace(self.actor)
        finally:
            self.pool.give_back(self.actor)
