"""LEAP for any environment: the generic layer knows no particular environment, every environment the CLI
lists compiles with its own defaults, and an environment that supplies only the protocol still gets a
working scripted expert."""

from __future__ import annotations

import ast
import csv
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest

from leap_dspy.envs import ENVIRONMENTS, TextEnv, make_env
from leap_dspy.envs.expertise import Expertise
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.rollout import expert_rollout
from leap_dspy.store import JsonlLog
from leap_dspy.teleprompt import LEAP, ConfigMismatch
from leap_dspy.train import TrainConfig
from leap_dspy.types import Correction, Observation, PrivilegedState, Task

ROOT = Path(__file__).resolve().parents[1]
FAST_TRAIN = TrainConfig(max_length=768, per_device_batch_size=8, gradient_accumulation=1, progress_bar=False)


def test_generic_code_imports_no_particular_environment() -> None:
    """Environment knowledge lives in envs/<name>/: nothing in leap_dspy/, programs/ or signatures/ imports it."""
    offenders = []
    for folder in ("leap_dspy", "programs", "signatures"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if any(f"envs.{env}" in n for env in ("alfworld", "webshop", "intercode"))]
    assert not offenders, offenders


def _tiny(name: str, tmp_path: Path) -> TextEnv:
    """The environment with its defaults, at a size a test can play."""
    if name.startswith("intercode"):
        if shutil.which("bwrap") is None and name == "intercode-bash":
            pytest.skip("bubblewrap is not installed (.ci/services.sh)")
        return make_env(name)
    sizes: dict[str, dict[str, Any]] = {
        "alfworld": {"task_types": ["pick_and_place_simple"], "num_train": 3, "num_seen": 1, "num_unseen": 1,
                     "cache_dir": str(tmp_path / "cache")},
        "webshop": {"num_products": 300, "num_train": 3, "num_seen": 1, "num_unseen": 1,
                    "cache_dir": str(tmp_path / "cache")},
    }
    return make_env(name, **sizes.get(name, {}))


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_every_environment_compiles_with_its_defaults(name: str, tiny_model: str, tmp_path: Path) -> None:
    """Default privilege level, default (scripted) expert: behaviour cloning and a round run, and the expert's
    own demonstrations and corrections are realizable as the check judges them."""
    env = _tiny(name, tmp_path)
    run = tmp_path / "run"
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=run, train=FAST_TRAIN, max_train_rows=8,
                rollout_tasks=2, lm={"max_new_tokens": 16}, num_threads=4, progress=False,
                train_launcher="")  # not an environment's setting: fine-tuned in this process, as it is quicker
    val = env.tasks("seen")[:1] + env.tasks("unseen")[:1]
    leap.compile(Student(), trainset=env.tasks("train")[:2], teacher=OracleExpert(), valset=val)
    with open(run / "metrics.csv") as handle:
        rows = {row["iteration"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["expert", "0", "1"]
    records = [c for k in (0, 1) for c in JsonlLog(run / f"iter_{k}" / "corrections.jsonl", Correction,
                                                    key=lambda c: c.key).load().values()]
    assert records, "no demonstration or correction was recorded"
    flagged = [(c.reason, c.unobserved) for c in records if c.unobserved]
    assert not flagged, flagged


class Boxes(TextEnv):
    """A user's environment with only the protocol: no expertise of its own. The key is in one of three boxes."""

    name: ClassVar[str] = "boxes"
    privilege_levels: ClassVar[dict[int, str]] = {0: "nothing", 1: "which box holds the key"}
    default_privilege_level: ClassVar[int] = 1
    max_steps = 6

    def __init__(self) -> None:
        self.key, self.opened, self.has_key = "", [], False

    def tasks(self, split: str) -> list[Task]:
        return [Task(id=f"{split}-{i}", env="boxes", split=split, instruction="take the key", key=color)
                for i, color in enumerate(("red", "green", "blue"))]

    def reset(self, task: Task) -> Observation:
        self.key, self.opened, self.has_key = task.key, [], False  # type: ignore[attr-defined]
        return self._observe("You see a red box, a green box and a blue box, all closed.")

    def step(self, action: str) -> Observation:
        box = action.removeprefix("open ").removesuffix(" box")
        if action == "take key" and self.key in self.opened:
            self.has_key = True
            return self._observe("You take the key.")
        if action.startswith("open ") and box in ("red", "green", "blue") and box not in self.opened:
            self.opened.append(box)
            return self._observe(f"You open the {box} box. " + ("You see a key." if box == self.key else "Empty."))
        return self._observe("Nothing happens.")

    def _observe(self, text: str) -> Observation:
        actions = [f"open {b} box" for b in ("red", "green", "blue") if b not in self.opened]
        actions += ["take key"] if self.key in self.opened and not self.has_key else []
        return Observation(text=text, done=self.has_key, success=self.has_key, reward=float(self.has_key),
                           admissible_actions=actions)

    def privileged_state(self, level: int) -> PrivilegedState:
        self.check_level(level)
        return PrivilegedState(level=level, sections={"key": f"the key is in the {self.key} box"} if level else {})

    def oracle_action(self) -> str | None:
        return "take key" if self.key in self.opened else f"open {self.key} box"

    def config(self) -> dict[str, Any]:
        return {}


def test_an_environment_with_only_the_protocol_gets_an_honest_scripted_expert() -> None:
    """The default expertise follows the oracle, says no more than it knows, and flags the oracle's choice of
    box where the action names what only the privileged state holds... which here it cannot: the box's name is
    on screen, so the environment would have to say (its own `Expertise.unjustified`)."""
    env = Boxes()
    assert isinstance(env.expertise(), Expertise)
    trajectories = expert_rollout(OracleExpert(), Student(), env, env.tasks("train"), level=1, num_threads=1)
    assert all(t.success for t in trajectories)
    for t in trajectories:
        for s in t.steps:
            assert s.reason == f"The next step towards the task is: {s.action}."
    hidden = PrivilegedState(level=1, sections={"key": "the key is in the cellar"}, oracle_action="go to cellar")
    step = trajectories[0].steps[0]
    assert "known only from the privileged state" in (Expertise().unjustified(step.inputs, hidden, "go to cellar")
                                                       or "")
    assert Expertise().unjustified(step.inputs, hidden, "open red box") is None
    # A term only the oracle's action holds may be computed from what the student saw: the flag says so.
    chosen = PrivilegedState(level=1, sections={"key": "the key is in the red box"}, oracle_action="dig at 25")
    why = Expertise().unjustified(step.inputs, chosen, "dig at 25") or ""
    assert "25" in why and "the oracle chose it" in why and "privileged state" not in why


class BrokenBoxes(Boxes):
    """Boxes whose own code raises: `step` once the green box is open, `oracle_action` on the blue one's task."""

    def step(self, action: str) -> Observation:
        if "green" in self.opened:
            raise RuntimeError("the green box jammed")
        return super().step(action)

    def oracle_action(self) -> str | None:
        if self.key == "blue":
            raise KeyError("no plan for blue")
        return super().oracle_action()


def test_an_environment_that_raises_ends_that_episode_alone_and_records_why() -> None:
    """A user's environment may raise in `step` or `oracle_action`: the episode ends with the failure recorded
    (task, step, call), its earlier steps kept, while the others play on, and the stage's metrics count it."""
    from leap_dspy.metrics import split_metrics

    env = BrokenBoxes()
    red, green, blue = expert_rollout(OracleExpert(), Student(), env, env.tasks("train"), level=1, num_threads=3)
    assert red.success and red.error is None
    assert not green.success and len(green.steps) == 1  # opening the green box worked; taking the key raised
    assert green.error == ("step 1: the environment's step('take key') raised RuntimeError: the green box jammed")
    assert not blue.success and not blue.steps
    assert blue.error == "step 0: the environment's oracle_action() raised KeyError: 'no plan for blue'"
    assert split_metrics([red, green, blue])["environment_failures"] == 2

    # Before a compile the check plays the expert too: the environment's failure there is a warning, as the
    # episode's end is all a run suffers from it; an expert's own failure is no environment failure.
    from leap_dspy.envs.check import check_env

    [warning, lost] = check_env(env, env.tasks("train")[2])
    assert warning.startswith("BrokenBoxes failed while the scripted expert played task train-2, at step 0: the "
                              "environment's oracle_action() raised KeyError") and "did not win" in lost
    clumsy = ClumsyBoxes()
    assert "environment_failures" not in split_metrics(expert_rollout(OracleExpert(), Student(), clumsy,
                                                                      clumsy.tasks("train"), level=1))


class TerseBoxes(Boxes):
    """Boxes whose `step` answers an action it does not know with a bare string, not an `Observation`."""

    def step(self, action: str) -> Observation:
        if action == "take key" or action.startswith("open "):
            return super().step(action)
        return "I do not know that action."  # type: ignore[return-value]


def test_an_environment_that_returns_no_observation_ends_that_episode_and_fails_the_contract_check() -> None:
    """A wrong return type ends the episode like a raise (not the compile, with an AttributeError deep in the
    episode runner); the contract check tries a stray action before anything runs, and says what to return."""
    import dspy

    from leap_dspy.envs.check import EnvContractError, check_env

    student = Student()
    student.set_lm(dspy.utils.DummyLM([{"reason": "I dance.", "action": "dance"}] * 3))
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        played = student.run(TerseBoxes(), Boxes().tasks("train")[0])
    assert not played.steps and not played.success
    assert played.error == "step 0: the environment's step('dance') returned str, not a leap_dspy.types.Observation"
    env = TerseBoxes()
    with pytest.raises(EnvContractError, match=r"TerseBoxes.step\(''\) returned str.*info\['valid'\] False"):
        check_env(env, env.tasks("train")[0])


class ClumsyExpertise(Expertise):
    """An expertise of its own, with a bug: it raises once a box is open."""

    def act(self, inputs: Any, privileged: PrivilegedState, student_action: str) -> str | None:
        if "You open" in inputs.observation:
            raise KeyError("opened")
        return "open red box"


class ClumsyBoxes(Boxes):
    def oracle_action(self) -> str | None:
        return "open the purple box"  # never what this expertise plays: nothing to warn about

    def expertise(self) -> Expertise:
        return ClumsyExpertise()


def test_a_scripted_expert_that_raises_ends_its_episode_there_and_the_check_says_so() -> None:
    """The expert has no action to play at a step it failed: the episode ends there, the step kept with its
    error and the environment not stepped with an empty action (as it was, to the step limit). The contract
    check plays the expert as it demonstrates, so an oracle it never follows draws no warning."""
    from leap_dspy.envs.check import check_env

    env = ClumsyBoxes()
    [played] = expert_rollout(OracleExpert(), Student(), env, env.tasks("train")[:1], level=1, num_threads=1)
    assert [s.action for s in played.steps] == ["open red box", ""]  # not played on to the step limit
    assert played.steps[-1].next_observation == played.steps[0].next_observation  # the failed step: not stepped
    assert (played.steps[-1].error or "").startswith("expert failed: KeyError")
    assert (played.error or "").startswith("step 1: expert failed: KeyError") and not played.success
    warnings = check_env(env, env.tasks("train")[0])
    assert len(warnings) == 2 and "the scripted expert failed on task train-0, at step 1: expert" in warnings[0]
    assert "did not win" in warnings[1] and not any("purple" in w for w in warnings)


def test_a_demonstrator_that_loses_most_training_tasks_is_warned_about() -> None:
    """An expertise with a bug that still wins a few tasks trains behaviour cloning on those few: said once, where
    it happens, rather than left to a reference row nobody reads."""
    from leap_dspy.corrections import few_won
    from leap_dspy.types import Trajectory

    tasks = Boxes().tasks("train")
    demos = {t.id: Trajectory(task=t, policy="expert", success=i == 0) for i, t in enumerate(tasks)}
    assert "won 1 of 3 training tasks; behaviour cloning keeps won episodes only" in (few_won(demos, True) or "")
    assert "trains on lost episodes too" in (few_won(demos, False) or "")
    demos[tasks[1].id].success = True
    assert few_won(demos, True) is None  # two of three
    lost = {k: t.model_copy(update={"success": False}) for k, t in demos.items()}
    assert few_won(lost, True) is None and few_won(lost, False)  # none won: `nothing_to_clone` stops the compile


class UnlistedBoxes(Boxes):
    """Boxes without an admissible list, saying `info["valid"]` instead; its oracle first tries a bad action."""

    def step(self, action: str) -> Observation:
        observation = super().step(action)
        observation.admissible_actions = None
        observation.info["valid"] = observation.text != "Nothing happens."
        return observation

    def reset(self, task: Task) -> Observation:
        self.tried = False
        return super().reset(task).model_copy(update={"admissible_actions": None})

    def oracle_action(self) -> str | None:
        if not self.tried:
            self.tried = True
            return "fly away"
        return super().oracle_action()


def test_an_environment_without_an_action_list_can_still_reject_an_action(tmp_path: Path) -> None:
    """Without `admissible_actions` the generic layer cannot judge an action; `info["valid"] = False` on the
    observation says the environment rejected it: the step records it, the contract check warns, and behaviour
    cloning drops the demonstration of it."""
    from leap_dspy.corrections import demonstration_records
    from leap_dspy.envs.check import check_env

    env = UnlistedBoxes()
    task = env.tasks("train")[0]
    assert any("'fly away' at step 0" in w and "rejected" in w for w in check_env(env, task, UnlistedBoxes()))
    [played] = expert_rollout(OracleExpert(), Student(), env, [task], level=1, num_threads=1)
    assert played.success and [s.valid for s in played.steps] == [False, True, True]
    log = JsonlLog(tmp_path / "c.jsonl", Correction, key=lambda c: c.key)
    demonstration_records([played], log, 1, env.expertise())
    dropped = [c.dropped for c in sorted(log.load().values(), key=lambda c: c.step)]
    assert dropped[0] is not None and "rejected" in dropped[0] and dropped[1:] == [None, None]


class WaitingBoxes(Boxes):
    """Boxes where `wait` is always listed and does nothing; with `says_so` the observation tells LEAP that."""

    def __init__(self, says_so: bool = True) -> None:
        super().__init__()
        self.says_so = says_so

    def step(self, action: str) -> Observation:
        if action != "wait":
            return super().step(action)
        observation = self._observe("You wait.")
        observation.info["changed"] = False if self.says_so else None
        return observation

    def _observe(self, text: str) -> Observation:
        observation = super()._observe(text)
        observation.admissible_actions = [*(observation.admissible_actions or []), "wait"]
        return observation


def test_an_environment_can_say_an_admitted_action_changed_nothing() -> None:
    """`info["changed"] = False` counts an admitted action towards `max_invalid_streak` (what ALFWorld's
    `Nothing happens.` does), without the generic layer knowing any environment's words for it."""
    import dspy

    student = Student(max_invalid_streak=3)
    student.set_lm(dspy.utils.DummyLM([{"reason": "I wait.", "action": "wait"}] * 10))
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        told = student.run(WaitingBoxes(), Boxes().tasks("train")[0])
        untold = student.run(WaitingBoxes(says_so=False), Boxes().tasks("train")[0])
    assert len(told.steps) == 3 and all(step.valid for step in told.steps)
    assert len(untold.steps) == WaitingBoxes.max_steps


class DataBoxes(Boxes):
    """Boxes configured as users write them: a data file's `Path`, a tuple of colours."""

    def __init__(self, data: Path = Path("boxes.jsonl"), colours: tuple[str, ...] = ("red", "green", "blue")) -> None:
        super().__init__()
        self.data, self.colours = data, colours

    def config(self) -> dict[str, Any]:
        return {"data": self.data, "colours": self.colours}


def test_an_environment_configured_with_a_path_and_a_tuple_records_and_resumes(tiny_model: str,
                                                                              tmp_path: Path) -> None:
    """config.yaml stores what YAML can (a path as text, a tuple as a list), and a rerun compares the options
    as stored, so it resumes rather than refusing its own run as another configuration."""
    import yaml

    env = DataBoxes(tmp_path / "boxes.jsonl")
    for _ in range(2):
        leap = LEAP(env, iterations=0, model=tiny_model, run_dir=tmp_path / "run", train=FAST_TRAIN,
                    lm={"max_new_tokens": 16}, evaluate_expert=False, progress=False, train_launcher="")
        leap.compile(Student(), trainset=env.tasks("train")[:2], teacher=OracleExpert(), valset=[])
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["env"]
    assert recorded["data"] == str(tmp_path / "boxes.jsonl") and recorded["colours"] == ["red", "green", "blue"]


def test_a_resume_whose_tasks_say_something_else_under_the_same_ids_is_refused(tiny_model: str,
                                                                                tmp_path: Path) -> None:
    """A task file edited between a run and its resume keeps its ids (a line's index): the resumed stages would
    grade other tasks under the finished stages' names. A run recorded before the digest still resumes."""
    import yaml

    env, run = DataBoxes(tmp_path / "boxes.jsonl"), tmp_path / "run"
    train = env.tasks("train")[:2]

    def compile_(tasks: list[Task]) -> None:
        LEAP(env, iterations=0, model=tiny_model, run_dir=run, train=FAST_TRAIN, lm={"max_new_tokens": 16},
             evaluate_expert=False, progress=False, train_launcher="").compile(
            Student(), trainset=tasks, teacher=OracleExpert(), valset=[])

    compile_(train)
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["task_digest"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    compile_(train)  # as recorded before the digest: the ids match
    edited = [train[0].model_copy(update={"instruction": train[0].instruction + " Then close the door."}), train[1]]
    with pytest.raises(ConfigMismatch, match="task_digest: the tasks ask something else"):
        compile_(edited)
