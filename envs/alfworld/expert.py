"""Playing one ALFWorld game: textworld's PddlEnv with alfworld's wrappers, and the handcoded expert.

Everything here is shared by game generation (the solvability check) and by the environment at play time.

Three things are fixed or guarded here rather than in alfworld itself:

- alfworld 0.4.2's handcoded expert tracks its inventory by looking for "put" in the last command, but the
  command is now "move X to Y": for pick_two it believes it still holds the first object and loops. The
  tracker is given "put X to Y" for a "move X to Y" command (`tracker_command`), at generation and play time.
- The expert and the goal templates call the module-level `random`: the expert module's `random` is replaced
  by a thread-local proxy (`expert_rng`), so each game draws from its own seeded generator and threads never
  share one.
- The tatsu parsers and Fast Downward's translator are module globals: every call into textworld goes
  through `TEXTWORLD_LOCK`. Each PddlEnv holds its own copy of libdownward.so (textworld copies it), so the
  planner state itself is per instance; PddlEnvs are pooled because each copy is costly to make and to hold.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEXTWORLD_LOCK = threading.RLock()
"""Held around every textworld/Fast Downward call (load, reset, step): their parsers are module globals."""

EXPERT_MAX_STEPS = 200
WELCOME = "-= Welcome to TextWorld, ALFRED! =-"


class _ThreadLocalRandom:
    """Stands in for the `random` module inside alfworld's expert: draws from this thread's generator."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def rng(self) -> random.Random:
        rng = getattr(self._local, "rng", None)
        if rng is None:
            rng = self._local.rng = random.Random(0)
        return rng

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rng, name)


_PROXY = _ThreadLocalRandom()
_patched = False


def _patch_expert_random() -> None:
    global _patched
    if _patched:
        return
    from alfworld.agents.expert import handcoded_expert

    handcoded_expert.random = _PROXY  # type: ignore[assignment]
    _patched = True


@contextlib.contextmanager
def expert_rng(rng: random.Random) -> Iterator[None]:
    """Make alfworld's expert draw from `rng` in this thread for the duration."""
    _patch_expert_random()
    previous = getattr(_PROXY._local, "rng", None)
    _PROXY._local.rng = rng
    try:
        yield
    finally:
        _PROXY._local.rng = previous


def tracker_command(command: str) -> str:
    """The command as alfworld's expert state tracker expects it (the move->put workaround)."""
    return "put" + command[4:] if command.startswith("move ") else command


def normalise_command(command: str) -> str:
    """Light clean-up of a student's action text: whitespace, case, a trailing period, quotes."""
    text = " ".join(str(command).strip().split()).lower()
    text = text.strip("\"'`")
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text


_POOL: list[Any] = []
_POOL_LOCK = threading.Lock()
_POOL_MAX = 64


def acquire_pddl_env() -> Any:
    """A PddlEnv wrapped like alfworld does (demangled names, facts, admissible commands, won)."""
    with _POOL_LOCK:
        if _POOL:
            return _POOL.pop()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs import PddlEnv

    from leap_dspy.envs.alfworld import textworld_cache

    infos = textworld.EnvInfos(facts=True, admissible_commands=True, won=True)
    with TEXTWORLD_LOCK:
        textworld_cache.install()
        env = AlfredDemangler(PddlEnv(infos), shuffle=False)
    return env


def release_pddl_env(env: Any) -> None:
    if env is None:
        return
    with _POOL_LOCK:
        if len(_POOL) < _POOL_MAX:
            _POOL.append(env)


class Expert:
    """alfworld's HandCodedTWAgent, fed every command actually taken (the student's or its own)."""

    def __init__(self, game_file: str | Path, rng: random.Random) -> None:
        _patch_expert_random()
        from alfworld.agents.expert import HandCodedTWAgent

        self.rng = rng
        self.agent = HandCodedTWAgent(max_steps=EXPERT_MAX_STEPS)
        with expert_rng(rng):
            self.agent.reset(str(game_file))
        self.failed: str | None = None
        self.next_action: str | None = None

    def start(self, state: Any) -> str | None:
        """Observe the intro; the expert's first action is "look" as in alfworld's AlfredExpert."""
        with expert_rng(self.rng):
            self.agent.observe(state["feedback"])
        self.next_action = "look" if "look" in state["admissible_commands"] else None
        return self.next_action

    def update(self, state: Any, last_command: str) -> str | None:
        """Track the command just taken and compute the next action; None once the expert has given up."""
        from alfworld.agents.expert import HandCodedAgentTimeout
        from alfworld.agents.expert.handcoded_expert import HandCodedAgentFailed

        self.next_action = None
        if self.failed is not None:
            return None
        admissible = list(state["admissible_commands"])
        try:
            with expert_rng(self.rng):
                action = self.agent.policy.act(state, tracker_command(last_command))
                if action == last_command or (last_command == "look" and action not in admissible):
                    action = self.rng.choice(admissible)
        except (HandCodedAgentTimeout, HandCodedAgentFailed) as exc:
            self.failed = type(exc).__name__
            return None
        except Exception as exc:  # the expert's heuristics can index empty lists after odd student moves
            self.failed = f"{type(exc).__name__}: {exc}"
            return None
        if action not in admissible:
            self.failed = f"inadmissible: {action}"
            return None
        self.next_action = action
        return action


def play_expert(
    game_file: str | Path, seed: int, max_steps: int, env: Any = None
) -> tuple[bool, list[str], str]:
    """Let the handcoded expert play a game from the start: (won, commands, intro text)."""
    own = env is None
    env = env if env is not None else acquire_pddl_env()
    try:
        rng = random.Random(seed)
        with TEXTWORLD_LOCK:
            env.load(str(game_file))
            state = env.reset()
        intro = state["feedback"]
        expert = Expert(game_file, rng)
        action = expert.start(state)
        commands: list[str] = []
        won = bool(state["won"])
        while not won and action is not None and len(commands) < max_steps:
            with TEXTWORLD_LOCK:
                state, _, _ = env.step(action)
            commands.append(action)
            won = bool(state["won"])
            if not won:
                action = expert.update(state, action)
        return won, commands, intro
    finally:
        if own:
            release_pddl_env(env)


_ALFWORLD_DEFAULT_DATA = os.path.expanduser("~/.cache/alfworld")


def data_root_from_env() -> str | None:
    """$ALFWORLD_DATA when a user set it. alfworld sets it to ~/.cache/alfworld itself on import, so that
    value counts only when it really holds the official games."""
    value = os.environ.get("ALFWORLD_DATA")
    if not value:
        return None
    is_default = os.path.abspath(os.path.expanduser(value)) == os.path.abspath(_ALFWORLD_DEFAULT_DATA)
    if is_default and not os.path.isdir(os.path.join(_ALFWORLD_DEFAULT_DATA, "json_2.1.1")):
        return None
    return value
