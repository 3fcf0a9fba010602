"""The "write your own environment" example (`examples/keybox.py`): it plays by the protocol, its expertise is
realizable where the oracle is not, and it compiles from Python and from the CLI by import path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from leap_dspy.cli import app
from leap_dspy.envs import UnknownEnvironment, env_class
from leap_dspy.evaluation import StageEvaluations
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.programs.student import run_episode
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.rollout import Episodes, play_episodes, student_policy
from leap_dspy.store import JsonlLog
from leap_dspy.teleprompt import LEAP
from leap_dspy.train import TrainConfig
from leap_dspy.training_data import AnswerFit
from leap_dspy.types import StudentInputs, Trajectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `examples` is a folder of the repository, not an installed package

from examples.keybox import KeyBox, KeyboxExpertise, rattled  # noqa: E402

FAST_TRAIN = TrainConfig(max_length=512, per_device_batch_size=8, gradient_accumulation=1, progress_bar=False)
TINY = {"num_boxes": 3, "num_train": 3, "num_seen": 1, "num_unseen": 1, "max_steps": 10}


def expert_episode(env: KeyBox, split: str = "train", index: int = 0) -> Trajectory:
    """The realizable expert plays a task, each step recording the level-1 state and the oracle's action."""
    expertise, student = env.expertise(), Student()

    def act(inputs: StudentInputs) -> tuple[str, str, None]:
        privileged = env.privileged_state(1)
        privileged.oracle_action = env.oracle_action()
        action = expertise.act(inputs, privileged, "")
        assert action is not None
        return expertise.explain(inputs, privileged, action), action, None

    return run_episode(act, student.inputs, env, env.tasks(split)[index], capture_level=1, capture_oracle=True)


def metrics_rows(run: Path) -> list[str]:
    return [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def test_tasks_are_reproducible_and_unseen_ones_are_bigger() -> None:
    env = KeyBox(num_boxes=4)
    assert [t.model_dump() for t in env.tasks("train")] == [t.model_dump() for t in KeyBox(num_boxes=4).tasks("train")]
    assert {len(t.boxes) for t in env.tasks("train")} <= {3, 4}
    assert {len(t.boxes) for t in env.tasks("unseen")} <= {5, 6}
    assert type(env.clone()).__name__ == "KeyBox" and env.clone().config() == env.config()
    assert env.step("fly away").text.startswith("The episode is over")  # before any reset: nothing to do, no raise
    env.reset(env.tasks("train")[0])
    for action in ("fly away", "take key", "unlock door", "open door"):
        observation = env.step(action)
        assert not observation.done and action not in observation.admissible_actions


def test_the_realizable_expert_wins_and_says_only_what_the_student_saw() -> None:
    env = KeyBox()
    for split, index in (("train", 0), ("unseen", 3), ("unseen", 4)):
        trajectory = expert_episode(env, split, index)
        assert trajectory.success
        expertise = KeyboxExpertise()
        shaken = [s.action.removeprefix("shake ") for s in trajectory.steps if s.action.startswith("shake ")]
        assert shaken == trajectory.task.boxes[: len(shaken)] and shaken[-1] == trajectory.task.key_box
        assert [s.action for s in trajectory.steps if s.action.startswith("open ")] == [
            f"open {trajectory.task.key_box}", "open door"]  # only the box that rattled: never the trap
        for step in trajectory.steps:
            assert step.privileged is not None and step.privileged.sections
            assert unobserved_mentions(step.reason, step.inputs, step.privileged, step.action) == []
            assert expertise.unjustified(step.inputs, step.privileged, step.action) is None


def test_an_empty_box_springs_the_trap_and_a_shake_tells_where_the_key_is() -> None:
    env = KeyBox()
    task = next(t for t in env.tasks("train") if t.key_box != t.boxes[0])
    env.reset(task)
    assert "rattles" not in env.step(f"shake {task.boxes[0]}").text
    assert "a key rattles" in env.step(f"shake {task.key_box}").text
    observation = env.step(f"open {task.boxes[0]}")
    assert observation.done and not observation.success and "trap" in observation.text
    assert env.step("take key").text == "The episode is over." and env.oracle_action() is None


def test_the_oracle_straight_to_the_key_is_flagged_as_unjustified() -> None:
    env = KeyBox()
    task = next(t for t in env.tasks("train") if t.key_box != t.boxes[0])
    env.reset(task)
    inputs = Student().inputs(task, env.reset(task), [])
    privileged = env.privileged_state(1)
    privileged.oracle_action = env.oracle_action()
    assert privileged.oracle_action == f"open {task.key_box}"
    why = KeyboxExpertise().unjustified(inputs, privileged, privileged.oracle_action)
    assert why is not None and task.key_box in why
    assert KeyBox(realizable=False).expertise().act(inputs, privileged, "") == privileged.oracle_action


def test_env_class_takes_an_import_path_and_says_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert env_class("examples.keybox:KeyBox") is KeyBox
    for bad, says in (("examples.nowhere:KeyBox", "cannot import"), ("examples.keybox:Nope", "has no"),
                      ("examples.keybox:KeyboxExpertise", "not a TextEnv"), ("keybox", "module:Class")):
        with pytest.raises(UnknownEnvironment, match=says):
            env_class(bad)
    result = CliRunner().invoke(app, ["tasks", "--env", "examples.keybox:Nope"])
    assert result.exit_code == 2 and "has no" in result.output


def test_compiles_from_python_and_from_the_cli(tiny_model: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    env = KeyBox(**TINY)
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=tmp_path / "py", train_config=FAST_TRAIN,
                train_launcher="", lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False)
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))
    assert metrics_rows(tmp_path / "py") == ["expert", "0", "1"]
    # max_new_tokens 16: keybox's answers run longer, so their reasons were cut until each fits, unless the
    # answer does not fit even without one
    fit, signature, adapter = AnswerFit.of(tiny_model, 16), Student().step.signature, Student().adapter
    for stage in ("iter_0", "iter_1"):
        answers = [json.loads(line)["completion"][0]["content"]
                   for line in (tmp_path / "py" / stage / "train_rows.jsonl").read_text().splitlines()]
        bare = [adapter.format_assistant_message_content(signature, {**adapter.parse(signature, a), "reason": ""})
                for a in answers]
        assert answers and all(fit.count(a) <= 16 or fit.count(b) > 16 for a, b in zip(answers, bare, strict=True))
    trained = json.loads((tmp_path / "py" / "iter_0" / "train.json").read_text())
    assert trained["answers_cut"] + trained["answers_over_budget"] > 0  # 16 tokens: most lack room for an action
    expert_row = (tmp_path / "py" / "metrics.csv").read_text().splitlines()[1].split(",")
    assert expert_row[1:3] == ["1.0", "1.0"]  # the realizable expert wins every task within max_steps

    monkeypatch.chdir(ROOT)
    sets = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["compile", "--env", "examples.keybox:KeyBox", *sets, "--iterations", "1",
                                      "--model", tiny_model, "--run-dir", str(tmp_path / "cli"), "--threads", "4",
                                      "--max-train-rows", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert metrics_rows(tmp_path / "cli") == ["expert", "0", "1"]
    listed = CliRunner().invoke(app, ["tasks", "--env", "examples.keybox:KeyBox", *sets, "--as-recorded"])
    recorded = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())  # what a grid compares
    assert listed.exit_code == 0 and json.loads(listed.output) == {
        k: recorded[k] for k in ("trainset", "valset", "task_digest")}

    out = tmp_path / "unseen.jsonl"
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "cli"), "--threads", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    episodes = [Trajectory.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [t.task.id for t in episodes] == [t.id for t in env.tasks("unseen")]

    # A moved run folder evaluates its own adapter (student.json recorded the old path): the same episodes.
    (tmp_path / "cli").rename(tmp_path / "moved")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "moved"), "--threads", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    again = [Trajectory.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [[s.action for s in t.steps] for t in again] == [[s.action for s in t.steps] for t in episodes]


class _Wordy(Student):
    """A student that plays keybox's plan but writes 'the' before the key and the door: near misses."""

    def act(self, inputs: StudentInputs) -> tuple[str, str, str | None]:
        listed = [a.strip() for a in inputs.observation.split("Actions: ")[-1].split(",")]
        for action in ("take key", "unlock door", "open door"):
            if action in listed:
                verb, noun = action.split()
                return "plan", f"{verb} the {noun}", None
        box = rattled(inputs)
        return "plan", f"open {box}" if box else next(a for a in listed if a.startswith("shake ")), None


def _evaluations(leap: LEAP, student: Student) -> StageEvaluations:
    """The stage evaluations `LEAP.compile` makes, for a student of a test's own."""
    return StageEvaluations(leap.run, leap.config, leap.placement, leap.trackers, student, with_scores=False)


def test_evaluation_is_strict_and_reports_snapped_success_beside(tmp_path: Path) -> None:
    env = KeyBox(**TINY)
    leap = LEAP(env, run_dir=tmp_path / "run", progress=False, evaluate_snapped=True)
    evaluations = _evaluations(leap, student := _Wordy())
    tasks = env.tasks("seen") + env.tasks("unseen")
    evaluations.play("probe", student, tasks, extra={})
    metrics = json.loads((tmp_path / "run" / "probe" / "metrics.json").read_text())
    assert metrics["seen_success"] == metrics["unseen_success"] == 0.0  # "take the key" does not run as written
    assert metrics["seen_success_snapped"] == metrics["unseen_success_snapped"] == 1.0
    assert metrics["near_miss_episodes"] == 2 and metrics["snapped_actions"] == 0
    strict = (tmp_path / "run" / "probe" / "eval.jsonl").read_text()
    assert '"executed":null' in strict.replace(" ", "") and "take the key" in strict


def test_near_misses_replay_as_their_strict_episode_ends_and_a_cut_replay_on_resume(tmp_path: Path) -> None:
    env = KeyBox(**TINY)
    leap = LEAP(env, run_dir=tmp_path / "run", progress=False, evaluate_snapped=True)
    evaluations = _evaluations(leap, student := _Wordy())
    tasks = env.tasks("seen") + env.tasks("unseen")
    stage = tmp_path / "run" / "probe"
    replays = evaluations.replays("probe")
    strict = play_episodes(Episodes(JsonlLog(stage / "eval.jsonl", Trajectory, key=lambda t: t.task.id), tasks,
                                    "probe", student_policy(student, snap=False), replays=replays),
                           env, program=None, num_threads=2, progress=False)
    snapped = replays.log.load()
    assert sorted(snapped) == sorted(t.id for t in tasks)  # played in the same pass, before any second one
    assert all(t.success and t.num_snapped for t in snapped.values())
    assert not any(t.success for t in strict.values())

    lines = (stage / "eval_snapped.jsonl").read_text().splitlines(keepends=True)
    (stage / "eval_snapped.jsonl").write_text(lines[0])  # a stop after the first replay
    evaluations.play("probe", student, tasks, extra={})
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["unseen_success_snapped"] == metrics["seen_success_snapped"] == 1.0
    assert len(replays.log.load()) == len(tasks) and metrics["unseen_success"] == 0.0


def test_a_rollout_stops_where_the_student_repeats_an_action_that_changes_nothing():
    env = KeyBox(**TINY)
    task = env.tasks("train")[0]

    def look(inputs: StudentInputs) -> tuple[str, str, None]:
        return "I look around.", "look", None

    stuck = run_episode(look, Student().inputs, env, task, max_stuck=2)
    assert [s.action for s in stuck.steps] == ["look"] * 3  # the first look, then two that changed nothing
    played = run_episode(look, Student().inputs, env, task)  # evaluation plays its steps out
    assert len(played.steps) == env.max_steps


def test_a_round_plays_further_samples_until_it_has_visited_rollout_steps(tiny_model: str, tmp_path: Path) -> None:
    """Short episodes give a round few corrections: `rollout_steps` asks for more rollouts, sample by sample."""
    import json
    import random

    from leap_dspy.rollout import rollout_samples

    train = KeyBox(num_train=10).tasks("train")
    samples = list(rollout_samples(train, 3, 7))
    assert samples[0] == random.Random(7).sample(train, 3)  # the first sample is the one a round always drew
    assert sorted(t.id for s in samples for t in s) == sorted(t.id for t in train) and len(samples) == 4
    assert list(rollout_samples(train, None, 7)) == [train]

    env = KeyBox(**{**TINY, "num_train": 6})
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=tmp_path / "run", train_config=FAST_TRAIN,
                train_launcher="",
                lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False, rollout_tasks=1, rollout_steps=12,
                evaluate_base=False, evaluate_expert=False)
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(), valset=env.tasks("seen"))
    played = [json.loads(line) for line in (tmp_path / "run" / "iter_1" / "trajectories.jsonl").open()]
    steps = sum(len(t["steps"]) for t in played)
    assert len(played) > 1 and (steps >= 12 or len(played) == 6)  # more than one sample, until the budget
    assert steps - len(played[-1]["steps"]) < 12  # and no further than the sample that reached it


def test_a_privileged_self_has_no_reference_row(tiny_model: str, tmp_path: Path) -> None:
    """Before behaviour cloning the privileged self is the untrained student: an `expert` row of it would say 0."""
    from leap_dspy.programs import SelfExpert

    env = KeyBox(**TINY)
    leap = LEAP(env, iterations=0, model=tiny_model, run_dir=tmp_path / "run", train_config=FAST_TRAIN,
                train_launcher="", lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False,
                evaluate_base=False)
    leap.compile(Student(), trainset=env.tasks("train"), teacher=SelfExpert(), valset=env.tasks("seen"))
    assert metrics_rows(tmp_path / "run") == ["0"]


class _Planner(Student):
    """A DSPy user's student with a signature of its own: an extra `plan` output LEAP's rows cannot fill."""

    def __init__(self) -> None:
        import dspy

        super().__init__()
        self.step = dspy.Predict(self.step.signature.append("plan", dspy.OutputField()))


class _Thinker(Student):
    def __init__(self) -> None:
        import dspy

        super().__init__()
        self.step = dspy.ChainOfThought(self.step.signature)


def test_a_student_or_teacher_leap_cannot_train_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Training rows are written in `StudentStep`'s fields: another signature, a ChainOfThought or a teacher
    shaped like the student fails at once, with the run folder left empty; `None` unsets a setting."""
    env = KeyBox(**TINY)
    for student, says in ((_Planner(), "outputs"), (_Thinker(), "must be a dspy.Predict")):
        with pytest.raises(TypeError, match=says):
            LEAP(env, run_dir=tmp_path / "run", progress=False).compile(student, trainset=env.tasks("train"))
    with pytest.raises(TypeError, match="cannot be called as an expert"):
        LEAP(env, run_dir=tmp_path / "run", progress=False).compile(Student(), trainset=env.tasks("train"),
                                                                    teacher=Student())
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert LEAP(env, rollout_tasks=None).config.rollout_tasks is None


def test_few_shot_demos_on_the_student_are_in_its_training_prompts_and_a_given_expertise_is_kept() -> None:
    """What BootstrapFewShot leaves on a student is part of every prompt it sends, so of its training rows too."""
    import dspy

    from leap_dspy.training_data import sft_rows
    from leap_dspy.types import Correction

    student = Student()
    inputs = StudentInputs(task="take the key", observation="You see a red box.", history="(none)")
    record = Correction(task_id="t", step=0, inputs=inputs, reason="r", action="shake red box", expert="x")
    plain = sft_rows(student.step.signature, student.adapter, [record])[0]["prompt"]
    demo = dspy.Example(**inputs.model_dump(), reason="I shake it.", action="shake red box")
    shown = sft_rows(student.step.signature, student.adapter, [record], demos=[demo])[0]["prompt"]
    assert len(shown) == len(plain) + 2 and "I shake it." in shown[-2]["content"]

    mine = KeyboxExpertise()
    expert = OracleExpert(expertise=mine)
    expert.attach(KeyBox(**TINY))
    assert expert.expertise is mine


def test_leap_takes_its_settings_as_a_config_a_mapping_or_keywords(tmp_path: Path) -> None:
    """A mapping (what a YAML file gives) configures LEAP as `LEAPConfig(**mapping)` does, keywords over it;
    anything else is refused by name rather than failing inside pydantic."""
    from leap_dspy.config import LEAPConfig

    env = KeyBox(**TINY)
    as_config = LEAP(env, LEAPConfig(iterations=1, lm={"max_new_tokens": 16}), run_dir=tmp_path / "a").config
    as_mapping = LEAP(env, {"iterations": 1, "lm_kwargs": {"max_new_tokens": 16}}, run_dir=tmp_path / "b").config
    assert as_mapping == as_config and as_mapping.iterations == 1
    assert LEAP(env, {"iterations": 1}, iterations=3, run_dir=tmp_path / "c").config.iterations == 3
    with pytest.raises(TypeError, match="a LEAPConfig or a mapping of its settings, not str"):
        LEAP(env, "config.yaml", run_dir=tmp_path / "d")  # type: ignore[arg-type]
