"""A contract check for a `TextEnv`, in the spirit of gymnasium's `check_env`: the scripted expert plays one task
before a compile starts, so that a broken environment fails at once with what is wrong (or is warned about),
not with a traceback in the middle of a round or with demonstrations silently dropped.
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


def check_env(env: TextEnv, task: Task, episode_env: Any = None, *, expert: Any = None,
              student: Any = None) -> list[str]:
    """Check `env`'s contract on `task`, played on `episode_env` (an episode's clone, or a Ray actor's) or `env`
    itself; raises `EnvContractError` for what no run can work around, returns warnings for the rest.

    Where the demonstrator `expert` (default an `OracleExpert` with the environment's expertise) is scripted, it
    then plays the task as it demonstrates (at the top privilege level, through `student`'s prompts, default
    `Student()`), and each step it would have dropped, or a lost episode, is a warning; an LM is not asked."""
    from leap_dspy.programs import OracleExpert

    name, expert = type(env).__name__, expert or OracleExpert()
    _check_rebuild(env, name)
    played = env if episode_env is None else episode_env
    try:
        _call(name, f"reset({task.id!r})", played.reset, task)
        _check_privileged(played, env.privilege_levels, name)
        _check_any_action(played, task, name)
        return _demonstrate(env, played, task, name, expert, student) if getattr(expert, "scripted", False) else []
    finally:
        played.close()


def _demonstrate(env: TextEnv, played: Any, task: Task, name: str, expert: Any, student: Any) -> list[str]:
    """The scripted expert's episode, by the runner every episode goes through, read for what demonstrations
    of it would drop, or where it ended early."""
    from leap_dspy.programs import Student
    from leap_dspy.rollout import expert_policy

    play = expert_policy(expert, student or Student(), env, level=max(env.privilege_levels), warn=False)
    trajectory, warnings = play(played, task), []
    if trajectory.error is None:
        _check_privileged(played, env.privilege_levels, name)  # in the state the episode ended in, too
    else:  # the contract: only that episode ends; said here, once
        failed = "the scripted expert failed on" if trajectory.policy_failed else \
            f"{name} failed while the scripted expert played"
        warnings.append(f"{failed} task {task.id}, at {trajectory.error}: demonstrations that reach that state "
                        "end there")
    who = _who(expert, name)
    for step in trajectory.steps:
        where = f"at step {step.index} of task {task.id}"
        if step.error:
            continue  # the failure above
        if not action_admissible(step.action, step.admissible_actions):
            warnings.append(f"{who} gave {step.action!r} {where}, not in its admissible_actions: demonstrations "
                            "drop such steps")
        elif not step.valid:
            warnings.append(f"{who} gave {step.action!r} {where}, which the environment rejected "
                            "(info['valid'] is False): demonstrations drop such steps")
    if not trajectory.success:
        warnings.append(f"the scripted expert did not win task {task.id} in {len(trajectory.steps)} steps: "
                        "behaviour cloning keeps won episodes only (bc_successful_only)")
    return warnings


def _who(expert: Any, name: str) -> str:
    """Whose choice a demonstrated action was: the oracle's where the expertise follows it, else the expertise's."""
    from leap_dspy.envs.expertise import Expertise

    expertise = getattr(expert, "expertise", None)
    if expertise is None or type(expertise).act is Expertise.act:
        return f"{name}.oracle_action()"
    return f"the scripted expert ({type(expertise).__name__}.act)"


def _call(name: str, method: str, function: Any, argument: Any, hint: str = "") -> Observation:
    try:
        obs = function(argument)
    except Exception as exc:  # an environment that cannot run an episode: no run can work around it
        raise EnvContractError(f"{name}.{method} failed: {type(exc).__name__}: {exc}{hint}") from exc
    if not isinstance(obs, Observation):
        raise EnvContractError(f"{name}.{method} returned {type(obs).__name__}, not a leap_dspy.types.Observation"
                               f"{hint}")
    return obs


ANY_ACTIONS = ("", "xyzzy 42")
"""What a student may write (a malformed answer parses to an empty action)."""


def _check_any_action(env: Any, task: Task, name: str) -> None:
    """`step` answers whatever a student writes with an `Observation`: one that raised would end every episode
    an untrained student plays at its first stray word."""
    for action in ANY_ACTIONS:
        _call(name, f"reset({task.id!r})", env.reset, task)
        _call(name, f"step({action!r})", env.step, action, hint=": a student's action can be anything, an empty "
              "one included; answer what cannot run with an Observation whose text says why and info['valid'] "
              "False")


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
