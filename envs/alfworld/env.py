"""The ALFWorld text environment: textworld's PddlEnv over alfworld's PDDL domain and its handcoded expert."""

from __future__ import annotations

import contextlib
import copy
import os
import random
from pathlib import Path
from typing import Any, ClassVar

from leap_dspy.envs.alfworld import expert as ex
from leap_dspy.envs.alfworld.expertise import ALFWorldExpertise
from leap_dspy.envs.alfworld.generate import TASK_TYPES
from leap_dspy.envs.alfworld.notes import transcript_notes
from leap_dspy.envs.alfworld.tasks import ALFWorldTask, cached_tasks
from leap_dspy.envs.base import TextEnv
from leap_dspy.types import Observation, PrivilegedState, Split, Task

NOTHING = "Nothing happens."


def _strip_welcome(text: str) -> str:
    if text.lstrip().startswith(ex.WELCOME):
        text = text.lstrip()[len(ex.WELCOME) :]
    return text.strip()


class ALFWorld(TextEnv):
    """ALFWorld (Shridhar et al., 2021) as a LEAP text environment.

    Offline it plays games generated from alfworld's shipped floor plans (see `generate.py`); when `data_dir`
    or `$ALFWORLD_DATA` holds the official games (json_2.1.1/...), it plays those.
    """

    name: ClassVar[str] = "alfworld"
    privilege_levels: ClassVar[dict[int, str]] = {
        0: "nothing",
        1: "object locations: where the task's objects (and the lamp) are, and which receptacles are targets",
        2: "locations + states: open/closed receptacles, hot/cool/clean objects, lamp, agent place, hands",
        3: "locations + states + the handcoded expert's remaining plan from the current state",
    }
    default_privilege_level: ClassVar[int] = 3
    idle_actions: ClassVar[tuple[str, ...]] = ("help", "look", "inventory")

    def __init__(
        self,
        num_receptacles: int = 5,
        task_types: list[str] | tuple[str, ...] | None = None,
        num_train: int | None = 120,
        num_seen: int | None = 5,
        num_unseen: int | None = 60,
        seed: int = 0,
        max_steps: int = 20,
        cache_dir: str | None = None,
        data_dir: str | None = None,
        notes: bool = True,
        realizable_search: bool = True,
    ) -> None:
        types = list(task_types) if task_types else list(TASK_TYPES)
        unknown = [t for t in types if t not in TASK_TYPES]
        if unknown:
            raise ValueError(f"alfworld: unknown task types {unknown}; choose from {list(TASK_TYPES)}")
        if num_receptacles < 3:
            raise ValueError("alfworld: num_receptacles must be at least 3")
        if int(max_steps) < 1:
            raise ValueError(f"alfworld: max_steps must be at least 1, not {max_steps}")
        for key, count in (("num_train", num_train), ("num_seen", num_seen), ("num_unseen", num_unseen)):
            if count is not None and count < 0:
                raise ValueError(f"alfworld: {key} must be 0 or more, not {count}")
        if data_dir is not None and not Path(os.path.expandvars(str(data_dir))).expanduser().is_dir():
            raise ValueError(f"alfworld: data_dir {data_dir} is not a folder (from {Path.cwd()})")
        self.num_receptacles = int(num_receptacles)
        self.task_types = types
        self.num_train, self.num_seen, self.num_unseen = num_train, num_seen, num_unseen
        self.seed = int(seed)
        self.max_steps = int(max_steps)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.data_dir = None if data_dir is None else str(data_dir)
        self.notes = bool(notes)
        """Return `Observation.notes` (see `notes.py`): what the episode has shown so far about the student's
        hands, the objects it needs and the places it has not searched, computed from the texts it was shown."""
        self.realizable_search = bool(realizable_search)
        """The scripted expert searches the way the student can (see `ALFWorldExpertise`)."""
        self._env: Any = None
        self._loaded: str | None = None
        self._clear_episode()

    # -- configuration and tasks ----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "num_receptacles": self.num_receptacles,
            "task_types": list(self.task_types),
            "num_train": self.num_train,
            "num_seen": self.num_seen,
            "num_unseen": self.num_unseen,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "cache_dir": self.cache_dir,
            "data_dir": self.data_dir,
            "notes": self.notes,
            "realizable_search": self.realizable_search,
        }

    def _cache_root(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        from leap_dspy.lm.models import cache_dir

        return cache_dir() / "alfworld"

    def _data_root(self) -> Path | None:
        root = self.data_dir or ex.data_root_from_env()
        return Path(os.path.expandvars(root)).expanduser() if root else None

    def tasks(self, split: Split) -> list[ALFWorldTask]:  # type: ignore[override]
        if split not in ("train", "seen", "unseen"):
            raise ValueError(f"alfworld: unknown split {split!r}")
        cfg = {k: v for k, v in self.config().items() if k not in ("cache_dir", "data_dir", "notes")}
        return cached_tasks(cfg, split, self._cache_root(), self._data_root())

    # -- episode ---------------------------------------------------------------------------------------

    def _clear_episode(self) -> None:
        self._task: ALFWorldTask | None = None
        self._state: Any = None
        self._expert: ex.Expert | None = None
        self._history: list[str] = []
        self._steps = 0
        self._done = False
        self._won = False
        self._intro = ""
        self._turns: list[tuple[str, str]] = []
        self._plan_cache: tuple[int, list[str]] | None = None

    def _as_task(self, task: Task | dict[str, Any]) -> ALFWorldTask:
        if isinstance(task, ALFWorldTask):
            return task
        data = task.model_dump() if isinstance(task, Task) else dict(task)
        return ALFWorldTask(**data)

    def reset(self, task: Task) -> Observation:
        task = self._as_task(task)
        self._clear_episode()
        self._task = task
        if self._env is None:
            self._env = ex.acquire_pddl_env()
        with ex.TEXTWORLD_LOCK:
            if self._loaded != task.game_file:
                self._loaded = None
                self._env.load(task.game_file)
                self._loaded = task.game_file
            state = self._env.reset()
        self._state = state
        self._intro = state["feedback"]
        self._expert = ex.Expert(task.game_file, random.Random(task.expert_seed))
        self._expert.start(state)
        return Observation(
            text=_strip_welcome(state["feedback"]),
            notes=self._notes(),
            admissible_actions=list(state["admissible_commands"]),
            info={"task_type": task.task_type, "steps": 0, "max_steps": self.max_steps},
        )

    def _resolve(self, action: str) -> str:
        """Map the student's text onto an admissible command where the intent is unambiguous."""
        command = ex.normalise_command(action)
        admissible = self._state["admissible_commands"] if self._state is not None else []
        if command in admissible:
            return command
        # ALFWorld's older grammar said "put X in/on Y"; this one says "move X to Y"
        for prefix in ("put ",):
            if command.startswith(prefix):
                for sep in (" in/on ", " into ", " in ", " on ", " to "):
                    if sep in command:
                        obj, _, rec = command[len(prefix) :].partition(sep)
                        alt = f"move {obj.strip()} to {rec.strip()}"
                        if alt in admissible:
                            return alt
        if command in ("inventory", "i"):
            return "inventory"
        return command

    def step(self, action: str) -> Observation:
        if self._task is None or self._state is None:
            return Observation(
                text="No episode is running: call reset(task) first.", done=True, info={"error": "not reset"}
            )
        if self._done:
            return Observation(
                text="The episode is over.",
                done=True,
                success=self._won,
                reward=0.0,
                admissible_actions=[],
                info={"steps": self._steps},
            )
        command = self._resolve(action)
        valid = command in self._state["admissible_commands"]
        try:
            with ex.TEXTWORLD_LOCK:
                state, _, _ = self._env.step(command if valid else "__invalid__")
        except Exception as exc:  # never raise on a student's action
            return Observation(
                text=NOTHING,
                notes=self._notes(),
                admissible_actions=list(self._state["admissible_commands"]),
                info={"steps": self._steps, "valid": False, "changed": False, "error": repr(exc)},
            )
        self._state = state
        self._history.append(command if valid else action)
        self._steps += 1
        self._won = bool(state["won"])
        self._done = self._won or self._steps >= self.max_steps
        self._plan_cache = None
        # an invalid command changes nothing, so the expert keeps its previous next action
        if self._expert is not None and not self._done and valid:
            self._expert.update(state, command)
        text = state["feedback"].strip() if valid else NOTHING
        self._turns.append((command if valid else action, text))
        return Observation(
            text=text,
            notes=None if self._done else self._notes(),
            reward=1.0 if self._won else 0.0,
            done=self._done,
            success=self._won,
            admissible_actions=[] if self._done else list(state["admissible_commands"]),
            info={
                "steps": self._steps,
                "max_steps": self.max_steps,
                "valid": valid,
                "changed": text != NOTHING,  # an admissible command can do nothing too (open an open drawer)
                "won": self._won,
                "task_type": self._task.task_type,
            },
        )

    def _notes(self) -> str | None:
        if not self.notes or self._task is None:
            return None
        return transcript_notes(self._task.instruction, _strip_welcome(self._intro), self._turns)

    def expertise(self) -> ALFWorldExpertise:
        expertise = ALFWorldExpertise(realizable_search=self.realizable_search)
        if not self.notes:  # the policy below the top reads the student's notes: without them it has no step
            expertise.levels = ()
        return expertise

    # -- the oracle ---------------------------------------------------------------------------------------

    def _planner_plan(self, env: Any) -> list[str]:
        """Fast Downward's plan from the current state of `env` (privileged: it knows where things are)."""
        pddl_env = env._wrapped_env
        with ex.TEXTWORLD_LOCK:
            return list(pddl_env._pddl_state.replan(pddl_env._entity_infos))

    def oracle_action(self) -> str | None:
        """The handcoded expert's next action, tracked through every command taken this episode.

        If the expert has given up or proposes an inadmissible command (it can, after some student moves),
        the first step of Fast Downward's plan from the current state is returned instead.
        """
        if self._state is None or self._done:
            return None
        if self._expert is not None and self._expert.next_action is not None:
            return self._expert.next_action
        plan = self._planner_plan(self._env)
        if plan and plan[0] in self._state["admissible_commands"]:
            return plan[0]
        return None

    def expert_plan(self, limit: int = 60) -> list[str]:
        """The oracle's remaining plan from the current state, by replaying the episode in a scratch game."""
        if self._task is None or self._done:
            return []
        if self._plan_cache is not None and self._plan_cache[0] == len(self._history):
            return list(self._plan_cache[1])
        scratch = ex.acquire_pddl_env()
        plan: list[str] = []
        try:
            with ex.TEXTWORLD_LOCK:
                scratch.load(self._task.game_file)
                state = scratch.reset()
                for command in self._history:
                    state, _, _ = scratch.step(command)
            expert = copy.deepcopy(self._expert) if self._expert is not None else None
            won = bool(state["won"])
            while not won and len(plan) < limit:
                action = expert.next_action if expert is not None else None
                if action is None:
                    replan = self._planner_plan(scratch)
                    plan += replan[: limit - len(plan)]
                    break
                with ex.TEXTWORLD_LOCK:
                    state, _, _ = scratch.step(action)
                plan.append(action)
                won = bool(state["won"])
                if not won:
                    expert.update(state, action)
        finally:
            ex.release_pddl_env(scratch)
        self._plan_cache = (len(self._history), list(plan))
        return plan

    # -- privileged state ---------------------------------------------------------------------------------

    def _facts(self) -> list[tuple[str, list[str]]]:
        return [(f.name, [a.name.strip() for a in f.arguments]) for f in self._state["facts"]]

    def task_info(self) -> dict[str, Any]:
        """What the task asks for, from its pddl_params: for templated (scripted) reasons."""
        if self._task is None:
            return {}
        p = self._task.pddl_params
        return {
            "task_type": self._task.task_type,
            "object_target": str(p.get("object_target", "")).lower(),
            "parent_target": str(p.get("parent_target", "")).lower(),
            "toggle_target": str(p.get("toggle_target", "")).lower(),
            "object_count": 2 if self._task.task_type == "pick_two_obj_and_place" else 1,
            "state_change": {
                "pick_clean_then_place_in_recep": "clean",
                "pick_heat_then_place_in_recep": "heat",
                "pick_cool_then_place_in_recep": "cool",
            }.get(self._task.task_type, ""),
            "instruction": self._task.instruction,
            "floor_plan": self._task.floor_plan,
        }

    def privileged_state(self, level: int) -> PrivilegedState:
        level = self.check_level(level)
        if level == 0 or self._state is None:
            return PrivilegedState(level=level)
        info = self.task_info()
        facts = self._facts()

        def of_type(name: str, kind: str) -> bool:
            return bool(kind) and name.rsplit(" ", 1)[0].replace(" ", "") == kind

        held = [args[1] for name, args in facts if name == "holds"]
        agent_loc = next((args[1] for name, args in facts if name == "atlocation"), None)
        here = sorted(
            args[0] for name, args in facts if name == "receptacleatlocation" and args[1] == agent_loc
        )
        locations: list[str] = []
        kinds = [info["object_target"], info["toggle_target"]]
        for name, args in sorted(facts):
            if name == "inreceptacle" and any(of_type(args[0], k) for k in kinds):
                locations.append(f"{args[0]} is in/on {args[1]}")
        locations += [f"you are holding {o}" for o in held if any(of_type(o, k) for k in kinds)]
        if info["parent_target"]:
            targets = sorted(
                {
                    args[0]
                    for name, args in facts
                    if name == "receptacletype" and of_type(args[0], info["parent_target"])
                }
            )
            if targets:
                locations.append(f"target receptacle(s): {', '.join(targets)}")
        sections: dict[str, str | list[str]] = {"object locations": locations}
        if level >= 2:
            states: list[str] = []
            opened = {args[0] for name, args in facts if name == "opened"}
            for name, args in sorted(facts):
                if name == "openable":
                    states.append(f"{args[0]} is {'open' if args[0] in opened else 'closed'}")
            for flag, word in (
                ("ishot", "hot"),
                ("iscool", "cool"),
                ("isclean", "clean"),
                ("issliced", "sliced"),
                ("ison", "on"),
                ("istoggled", "turned on"),
            ):
                states += [f"{args[0]} is {word}" for name, args in sorted(facts) if name == flag]
            states.append(f"you are at {', '.join(here)}" if here else "you are in the middle of the room")
            states.append(f"you are holding {', '.join(held)}" if held else "you are holding nothing")
            sections["states"] = states
        if level >= 3:
            sections["expert plan"] = self.expert_plan()
        return PrivilegedState(level=level, sections=sections)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        env, self._env, self._loaded = self._env, None, None
        ex.release_pddl_env(env)
        self._clear_episode()

    def __del__(self) -> None:  # return the Fast Downward copy to the pool
        with contextlib.suppress(Exception):
            self.close()
