"""A contract check for a `TextEnv`, in the spirit of gymnasium's `check_env`: the oracle plays one task before
a compile starts, so that a broken environment fails at once with what is wrong (or is warned about), not
with a traceback in the middle of a round or with demonstrations silently dropped.
"""

from __future__ import annotations

import inspect
from typing import Any

from leap_dspy.envs.base import TextEnv, action_admissible
from leap_dspy.types import Observation, PrivilegedState, Task


class EnvContractError(ValueError):
    """The environment breaks the `TextEnv` contract in a way no run can work around."""


def check_env(env: TextEnv, task: Task) -> list[str]:
    """Play `task` with the oracle, checking each call's result; raises `EnvContractError` for a broken
    contract, returns warnings (the oracle's inadmissible actions, a lost episode) for what a run survives."""
    name = type(env).__name__
    _check_rebuild(env, name)
    warnings: list[str] = []
    try:
        obs = _observation(env.reset(task), f"{name}.reset")
        for step in range(env.max_steps):
            _check_privileged(env, name)
            if obs.done:
                break
            action = env.oracle_action()
            if action is None:
                warnings.append(f"{name}.oracle_action() gave None at step {step} of task {task.id} before the "
                                "episode ended: the scripted expert has no step there")
                break
            if not action_admissible(action, obs.admissible_actions):
                warnings.append(f"{name}.oracle_action() gave {action!r} at step {step} of task {task.id}, not in "
                                "its admissible_actions: demonstrations drop such steps")
            obs = _observation(env.step(action), f"{name}.step")
        if not obs.success:
            warnings.append(f"the oracle did not win task {task.id} in {env.max_steps} steps: behaviour cloning "
                            "keeps won episodes only (bc_successful_only)")
    finally:
        env.close()
    return warnings


def _observation(obs: Any, call: str) -> Observation:
    if not isinstance(obs, Observation):
        raise EnvContractError(f"{call} returned {type(obs).__name__}, not a leap_dspy.types.Observation")
    return obs


def _check_privileged(env: TextEnv, name: str) -> None:
    """Every level of the dial gives a `PrivilegedState` that says which level it is."""
    for level in env.privilege_levels:
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
