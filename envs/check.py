"""A contract check for a `TextEnv`, in the spirit of gymnasium's `check_env`: the oracle plays one task before
a compile starts, so that a broken environment fails at once with what is wrong (or is warned about), not
with a traceback in the middle of a round or with demonstrations silently dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import yaml

from leap_dspy.envs.base import TextEnv, action_admissible
from leap_dspy.store import yaml_plain
from leap_dspy.types import Observation, PrivilegedState, Task


class EnvContractError(ValueError):
    """The environment breaks the `TextEnv` contract in a way no run can work around."""


def check_env(env: TextEnv, task: Task, episode_env: Any = None, oracle: bool = True) -> list[str]:
    """Check `env`'s contract, playing `task` on `episode_env` (an episode's clone, or a Ray actor's) or `env`
    itself, with the oracle where it is the demonstrator; raises `EnvContractError` for what no run can work
    around, returns warnings (an oracle step the environment would not admit, a lost episode) for the rest."""
    name = type(env).__name__
    _check_rebuild(env, name)
    played = env if episode_env is None else episode_env
    try:
        return _play(played, env.privilege_levels, task, name, oracle)
    finally:
        played.close()


def _play(env: Any, levels: Iterable[int], task: Task, name: str, oracle: bool) -> list[str]:
    obs = _call(name, "reset", env.reset, task)
    _check_privileged(env, levels, name)
    warnings: list[str] = []
    for step in range(env.max_steps if oracle else 0):
        if obs.done:
            break
        try:
            action = env.oracle_action()
        except Exception as exc:  # a user's oracle that cannot act here: the demonstrations will say so too
            return [f"{name}.oracle_action() failed at step {step}: {type(exc).__name__}: {exc}"]
        if action is None:
            warnings.append(f"{name}.oracle_action() gave None at step {step} of task {task.id} before the "
                            "episode ended: the scripted expert has no step there")
            break
        if not action_admissible(action, obs.admissible_actions):
            warnings.append(f"{name}.oracle_action() gave {action!r} at step {step} of task {task.id}, not in "
                            "its admissible_actions: demonstrations drop such steps")
        obs = _call(name, "step", env.step, action)
        if obs.info.get("valid") is False:
            warnings.append(f"{name}.oracle_action() gave {action!r} at step {step} of task {task.id}, which the "
                            "environment rejected (info['valid'] is False): demonstrations drop such steps")
        _check_privileged(env, levels, name)
    if oracle and not obs.success:
        warnings.append(f"the oracle did not win task {task.id} in {env.max_steps} steps: behaviour cloning "
                        "keeps won episodes only (bc_successful_only)")
    return warnings


def _call(name: str, method: str, function: Any, argument: Any) -> Observation:
    try:
        obs = function(argument)
    except Exception as exc:  # an environment that cannot run an episode: no run can work around it
        raise EnvContractError(f"{name}.{method}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obs, Observation):
        raise EnvContractError(f"{name}.{method} returned {type(obs).__name__}, not a leap_dspy.types.Observation")
    return obs


def _check_privileged(env: Any, levels: Iterable[int], name: str) -> None:
    """Every level of the dial gives a `PrivilegedState` that says which level it is."""
    for level in levels:
        state = env.privileged_state(level)
        if not isinstance(state, PrivilegedState):
            raise EnvContractError(f"{name}.privileged_state({level}) returned {type(state).__name__}, not a "
                                   "leap_dspy.types.PrivilegedState")
        if state.level != level:
            raise EnvContractError(f"{name}.privileged_state({level}) returned a state of level {state.level}")


def _check_rebuild(env: TextEnv, name: str) -> None:
    """`config()` must rebuild the same environment: runs record it, and side-by-side episodes use clones, so
    it names every constructor argument."""
    config = env.config()
    if not isinstance(config, dict):
        raise EnvContractError(f"{name}.config() returned {type(config).__name__}, not a dict of constructor "
                               "arguments")
    named = (p.name for p in inspect.signature(type(env)).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    missing = [p for p in named if p not in config]
    if missing:
        raise EnvContractError(f"{name}.config() leaves out constructor arguments {', '.join(missing)}: a clone "
                               "or a rebuilt run would not be the same environment")
    try:
        type(env)(**config).close()
    except TypeError as exc:
        raise EnvContractError(f"{name}(**{name}.config()) fails: {exc}") from exc
    try:
        yaml.safe_dump(yaml_plain(config))
    except yaml.YAMLError as exc:
        raise EnvContractError(f"{name}.config() holds a value config.yaml cannot record ({exc}): give text, "
                               "numbers, booleans, None, or lists and dicts of them") from exc
