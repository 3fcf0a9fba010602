"""The LEAP teleprompter on the real engine: real ALFWorld games, real DSPy, real TRL, a tiny random model.

The slow test at the end runs the embedded SmolLM2 end to end at a tiny size, as a user's compile does; the
others fine-tune in the test's own process (`train_launcher=""`), sparing the ~10 s of imports a fresh trainer
process costs on a small CPU (tests/test_distributed.py checks that both train the same adapter).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dspy
import pytest

from leap_dspy.config import LEAPConfig
from leap_dspy.envs.alfworld import ALFWorld
from leap_dspy.lm import DEFAULT_MODEL
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.runs import best_stage
from leap_dspy.serve_target import resolve_target
from leap_dspy.signatures import PrivilegedCorrection
from leap_dspy.store import JsonlLog, RunFileError
from leap_dspy.teleprompt import LEAP, ConfigMismatch
from leap_dspy.train import TrainConfig
from leap_dspy.training_data import (
    AnswerFit,
    aggregate_sft,
    balance_by_action,
    preference_rows,
    privileged_self_rows,
    sft_rows,
)
from leap_dspy.types import Correction, StudentInputs, Trajectory

FAST_TRAIN = TrainConfig(max_length=768, per_device_batch_size=8, gradient_accumulation=1, progress_bar=False)
FAST = {"train_config": FAST_TRAIN, "train_launcher": ""}  # small batches, trained in this process


def tiny_env(cache: Path) -> ALFWorld:
    return ALFWorld(num_receptacles=5, task_types=["pick_and_place_simple"], num_train=4, num_seen=1,
                    num_unseen=1, max_steps=16, cache_dir=str(cache))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ALFWorld:
    return tiny_env(tmp_path_factory.mktemp("alfworld-cache"))


class PeekingOracle(OracleExpert):
    """The oracle, handed the full privileged text as an LM expert would be: the leak test's worst case."""

    reads_privileged_text = True


def compile_tiny(env: ALFWorld, model: str, run_dir: Path, teacher: dspy.Module | None = None,
                 iterations: int = 1, **settings: Any) -> Student:
    leap = LEAP(env, iterations=iterations, model=model, run_dir=run_dir, **{**FAST, **settings},
                lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False)
    return leap.compile(Student(), trainset=env.tasks("train"), teacher=teacher or OracleExpert(),
                        valset=env.tasks("seen") + env.tasks("unseen"))


def test_privileged_state_never_reaches_a_student_training_row(env: ALFWorld, tiny_model: str,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    compile_tiny(env, tiny_model, run, teacher=PeekingOracle(), bc_rows=6)
    assert len((run / "iter_0" / "train_rows.jsonl").read_text().splitlines()) == 6  # bc_rows, not 2 x 240

    trajectories = JsonlLog(run / "iter_1" / "trajectories.jsonl", Trajectory, key=lambda t: t.task.id).load()
    privileged = [s.privileged for t in trajectories.values() for s in t.steps if s.privileged is not None]
    assert privileged, "the expert was given no privileged state: the test would prove nothing"
    assert all(p.sections for p in privileged)
    secrets = {p.to_text() for p in privileged}
    secrets |= {line for p in privileged for line in p.sections.get("object locations", [])}
    secrets |= {f"{name}:" for p in privileged for name in p.sections}
    assert any(" is in/on " in s for s in secrets)

    for k in (0, 1):
        rows = [json.loads(line) for line in (run / f"iter_{k}" / "train_rows.jsonl").read_text().splitlines()]
        assert rows
        for row in rows:
            prompt = "\n".join(m["content"] for m in row["prompt"])
            assert "privileged" not in prompt.lower()
            for secret in secrets:
                assert secret not in prompt, f"privileged text leaked into iter_{k}: {secret!r}"
            user = row["prompt"][-1]["content"]
            fields = [line for line in user.splitlines() if line.startswith("[[ ## ")]
            assert fields == ["[[ ## task ## ]]", "[[ ## history ## ]]", "[[ ## observation ## ]]"]


def test_compile_writes_the_run_folder_and_a_loadable_student(env: ALFWorld, tiny_model: str,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    student = compile_tiny(env, tiny_model, run, evaluate_base=True)
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["iteration", "seen_success", "unseen_success"]
    assert [line.split(",")[0] for line in lines[1:]] == ["base", "expert", "0", "1"]
    assert (run / "report.html").exists() and (run / "learning_curve.png").exists()
    assert (run / "iter_1" / "adapter" / "adapter_config.json").exists()
    rates = [json.loads((run / f"iter_{k}" / "train.json").read_text())["learning_rate"] for k in (0, 1)]
    assert rates == [FAST_TRAIN.lr_for("sft"), pytest.approx(FAST_TRAIN.lr_for("sft") / 10)]  # rounds continue gently
    expert_row = dict(zip(lines[0].split(","), lines[2].split(","), strict=True))
    assert float(expert_row["seen_success"]) == 1.0  # the oracle wins every generated game

    # The repetition guard must never forbid what the student is taught to write.
    from leap_dspy.lm.models import load_tokenizer

    lm = LEAP(env).config.lm
    tokenizer, n = load_tokenizer("smollm2-135m"), lm["no_repeat_ngram"]
    for line in (run / "iter_0" / "train_rows.jsonl").read_text().splitlines():
        answer = json.loads(line)["completion"][-1]["content"]
        ids = tokenizer.encode(answer, add_special_tokens=False)
        grams = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
        assert max(grams.values(), default=0) <= lm["ngram_repeats"], answer

    restored = Student()
    restored.load(str(run / "student.json"), allow_unsafe_lm_state=True)
    assert restored.step.lm.engine.adapter == str((run / "iter_1" / "adapter").resolve())
    assert student.step.lm.engine.adapter == restored.step.lm.engine.adapter
    assert json.loads((run / "compiled.json").read_text())["stage"] == 1  # select: last, Algorithm 1's

    # DAgger's rule on the same finished run: nothing trains again, the best stage on the seen tasks is returned.
    # The tiny random model ties its stages (a tie goes to the later), so behaviour cloning is made the best.
    for k, success in ((0, 1.0), (1, 0.0)):
        metrics = json.loads((run / f"iter_{k}" / "metrics.json").read_text())
        (run / f"iter_{k}" / "metrics.json").write_text(json.dumps({**metrics, "seen_success": success}))
    seen = {str(k): (m["seen_success"], m["seen_score"]) for k in (0, 1)
            if (m := json.loads((run / f"iter_{k}" / "metrics.json").read_text()))}
    assert best_stage(seen) == "0"
    best = LEAP(env, iterations=1, model=tiny_model, run_dir=run, **FAST, select="best",
                lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False).compile(
        Student(), trainset=env.tasks("train"), teacher=OracleExpert(), valset=env.tasks("seen") + env.tasks("unseen"))
    chosen = json.loads((run / "compiled.json").read_text())
    assert (chosen["stage"], chosen["select"], chosen["chosen_by"]) == (0, "best", "best seen success")
    bc = str((run / "iter_0" / "adapter").resolve())
    assert best.step.lm.engine.adapter == bc
    saved = Student()
    saved.load(str(run / "student.json"), allow_unsafe_lm_state=True)
    assert saved.step.lm.engine.adapter == bc
    assert resolve_target(str(run))[1] == str(run / "iter_0" / "adapter")

    with pytest.raises(ConfigMismatch):
        LEAP(env, iterations=1, model=tiny_model, run_dir=run, update="sft", max_train_rows=7,
             train_config=FAST_TRAIN, progress=False).compile(
            Student(), trainset=env.tasks("train"), valset=env.tasks("seen"))

    # A further round trains on every finished stage's records: a log emptied since is refused before it plays.
    (run / "iter_1" / "corrections.jsonl").write_text("")
    with pytest.raises(RunFileError, match="corrections.jsonl holds 0 of the"):
        LEAP(env, iterations=2, model=tiny_model, run_dir=run, **FAST, select="best", lm_kwargs={"max_new_tokens": 16},
             num_threads=4, progress=False).compile(
            Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
            valset=env.tasks("seen") + env.tasks("unseen"))
    assert not (run / "iter_2").exists()


RESUME_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_leap import compile_tiny, tiny_env
compile_tiny(tiny_env(Path({cache!r})), {model!r}, Path({run!r}))
"""


def test_a_killed_run_resumes_without_losing_or_duplicating_records(env: ALFWorld, tiny_model: str,
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = RESUME_SCRIPT.format(tests=str(Path(__file__).parent), cache=env.config()["cache_dir"],
                                  model=tiny_model, run=str(run))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = run / "iter_1" / "trajectories.jsonl"
    deadline = time.time() + 600
    evaluated_first = None
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and target.read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            evaluated_first = (run / "iter_0" / "metrics.json").exists()
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # Round 1's rollouts come before behaviour cloning's evaluation, owed until round 1's fine-tune: killed
    # during them, the resume must still evaluate behaviour cloning (metrics.csv's rows, below).
    assert evaluated_first is False
    before = target.read_text().count("\n")
    assert 1 <= before <= len(env.tasks("train"))  # the episodes of a round end in one batch
    with open(target, "a") as handle:  # the kill also tore a record in half
        handle.write('{"task": {"id": "alfworld-train-')

    compile_tiny(env, tiny_model, run)

    for name, model, key in (("trajectories.jsonl", Trajectory, lambda t: t.task.id),
                             ("eval.jsonl", Trajectory, lambda t: t.task.id),
                             ("corrections.jsonl", Correction, lambda c: c.key)):
        for k in (0, 1):
            path = run / f"iter_{k}" / name
            lines = path.read_text().splitlines()
            keys = [key(model.model_validate_json(line)) for line in lines]
            assert len(keys) == len(set(keys)), f"duplicated records in {path}"
    trajectories = (run / "iter_1" / "trajectories.jsonl").read_text().splitlines()
    assert len(trajectories) == len(env.tasks("train"))
    steps = sum(len(Trajectory.model_validate_json(line).steps) for line in trajectories)
    corrections = (run / "iter_1" / "corrections.jsonl").read_text().splitlines()
    assert len(corrections) == steps  # every visited step corrected exactly once
    rows = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == ["expert", "0", "1"]  # the untrained student is evaluated only when asked


def test_malformed_model_output_is_recorded_not_raised(env: ALFWorld) -> None:
    task = env.tasks("train")[0]
    answers = [
        {"reason": "I will not say what I do."},                                   # no action field
        {"reason": "Flying is faster.", "action": "fly to the moon"},                # not admissible
        {"reason": "Looking around.", "action": "look"},
    ]
    lm = dspy.utils.DummyLM(answers * 3)
    student = Student(max_invalid_streak=0)
    student.set_lm(lm)
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        trajectory = student.run(env.clone(), task, max_steps=3)
    first, second, third = trajectory.steps
    assert first.error is not None and first.action == ""
    assert first.next_observation == "Nothing happens."
    assert second.error is None and second.action == "fly to the moon"
    assert second.next_observation == "Nothing happens."
    assert third.action == "look" and third.next_observation != "Nothing happens."
    assert trajectory.num_errors == 1


def test_invalid_streak_ends_a_stuck_episode(env: ALFWorld) -> None:
    lm = dspy.utils.DummyLM([{"reason": "x", "action": "fly"}] * 10)
    student = Student(max_invalid_streak=3)
    student.set_lm(lm)
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        trajectory = student.run(env.clone(), env.tasks("train")[0])
    assert len(trajectory.steps) == 3 and not trajectory.success


def test_a_near_miss_runs_the_admissible_action_it_names_and_keeps_what_was_written(env: ALFWorld) -> None:
    task = env.tasks("train")[0]
    first = env.clone().reset(task).admissible_actions
    place = next(a for a in first if a.startswith("go to "))            # "go to cabinet 1"
    slip = "go to the " + place.removeprefix("go to ").rsplit(" ", 1)[0]  # "go to the cabinet": no number
    lm = dspy.utils.DummyLM([{"reason": "x", "action": slip}, {"reason": "y", "action": "go to the moon 1"},
                             {"reason": "z", "action": "look"}])
    student = Student(max_invalid_streak=0)
    student.set_lm(lm)
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        trajectory = student.run(env.clone(), task, max_steps=3)
    snapped, other, _ = trajectory.steps
    assert snapped.action == slip and snapped.executed is not None
    assert snapped.executed.rsplit(" ", 1)[0] == place.rsplit(" ", 1)[0]   # same kind of place, some number
    assert snapped.next_observation.startswith(f"You arrive at {snapped.executed.removeprefix('go to ')}")
    assert other.executed is None and other.next_observation == "Nothing happens."  # names no place here
    assert trajectory.num_snapped == 1
    # The student's history shows what ran; the written action stays what an expert corrects.
    # (Without the notes, so that the first step is still in the history, on its Earlier line.)
    history = Student(show_notes=False).inputs(task, env.clone().reset(task), trajectory.steps).history
    assert snapped.executed in history and slip not in history
    unsnapped = Student(snap_actions=False, max_invalid_streak=0)
    unsnapped.set_lm(dspy.utils.DummyLM([{"reason": "x", "action": slip}]))
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        assert unsnapped.run(env.clone(), task, max_steps=1).steps[0].next_observation == "Nothing happens."


@pytest.mark.slow
def test_end_to_end_on_the_embedded_smollm2(env: ALFWorld, tmp_path: Path) -> None:
    """BC + one LEAP iteration on the real 135M weights, at a tiny size (a few minutes on 2 cores): 16 rows a
    stage in batches of 4, enough steps for the loss to fall, few enough for a CPU without bf16 units."""
    run = tmp_path / "run"
    compile_tiny(env, DEFAULT_MODEL, run, bc_rows=16, max_train_rows=16,
                 train_config=FAST_TRAIN.model_copy(update={"per_device_batch_size": 4}),
                 train_launcher=LEAPConfig().train_launcher)  # the default: a fresh trainer process
    metrics = {json.loads((run / f"iter_{k}" / "metrics.json").read_text())["iteration"] for k in (0, 1)}
    assert metrics == {"0", "1"}
    train = json.loads((run / "iter_0" / "train.json").read_text())
    assert train["loss_history"][-1] < train["loss_history"][0]  # BC learns something on real weights


@pytest.mark.parametrize("update", ["dpo", "kto"])
def test_preference_updates_run_through_the_loop(env: ALFWorld, tiny_model: str, tmp_path: Path, update: str) -> None:
    run = tmp_path / update
    leap = LEAP(env, iterations=1, update=update, model=tiny_model, run_dir=run, **FAST,
                lm_kwargs={"max_new_tokens": 16}, num_threads=4, evaluate_base=False, evaluate_expert=False,
                progress=False)
    leap.compile(Student(), trainset=env.tasks("train"), valset=env.tasks("unseen"))
    rows = [json.loads(line) for line in (run / "iter_1" / "train_rows.jsonl").read_text().splitlines()]
    assert rows, "a random student disagrees with the oracle, so there must be preference rows"
    # Pairs where the student erred, and as many anchors at most: steps that were right, trained toward.
    if update == "dpo":
        pairs = [r for r in rows if not r.get("anchor")]
        anchors = [r for r in rows if r.get("anchor")]
        assert pairs and all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
                             for r in pairs)
        assert anchors and all(r["chosen"] == r["rejected"] for r in anchors)
    else:
        pairs = [r for r in rows if not r["label"]]
        anchors = rows[2 * len(pairs):]
        assert pairs and anchors and all(r["label"] for r in anchors)
    assert len(anchors) <= len(pairs) * (2 if update == "kto" else 1)
    assert len(rows) <= leap.config.max_train_rows
    train = json.loads((run / "iter_1" / "train.json").read_text())
    assert train["method"] == update and (run / "iter_1" / "adapter" / "adapter_config.json").exists()


def test_self_expert_that_cannot_answer_is_counted_not_fatal(env: ALFWorld, tiny_model: str, tmp_path: Path) -> None:
    """The untrained tiny student, as its own privileged expert, produces nothing parseable: every correction
    is dropped and counted, and the round still trains on the aggregate of earlier data instead of failing."""
    from leap_dspy.programs import SelfExpert

    run = tmp_path / "self"
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=run, **FAST, expert_retries=1,
                lm_kwargs={"max_new_tokens": 16}, num_threads=4, evaluate_base=False, evaluate_expert=False,
                progress=False)
    leap.compile(Student(), trainset=env.tasks("train"), teacher=SelfExpert(), valset=env.tasks("unseen"))
    metrics = json.loads((run / "iter_1" / "metrics.json").read_text())
    assert metrics["corrections"] > 0 and metrics["corrections_dropped"] == metrics["corrections"]
    assert 0 < metrics["eval_generate_s"] <= metrics["eval_s"] and metrics["eval_remembered"] >= 0
    assert json.loads((run / "iter_1" / "train.json").read_text())["method"] == "sft"
    assert (run / "iter_1" / "adapter" / "adapter_config.json").exists()
    demos = (run / "iter_0" / "trajectories.jsonl").read_text().splitlines()
    assert all(json.loads(line)["policy"] == "expert" for line in demos)  # BC came from the scripted oracle

    # Behaviour cloning also trained the weights in the expert's part, on the same demonstrations: expert
    # prompts carry the privileged state (and not the student's step: it writes its own), completed by the
    # demonstrated step.
    rows = [json.loads(line) for line in (run / "iter_0" / "train_rows.jsonl").read_text().splitlines()]
    expert_rows = [r for r in rows if "[[ ## privileged_state ## ]]" in r["prompt"][-1]["content"]]
    assert expert_rows and len(expert_rows) < len(rows)
    assert not any("[[ ## student_action ## ]]" in r["prompt"][-1]["content"] for r in expert_rows)
    assert json.loads((run / "iter_0" / "metrics.json").read_text())["train_examples"] == len(rows)

    # A privileged self that sees the student's step learns to judge one: kept where it was the demonstrated
    # step, replaced where not.
    def field(text: str, name: str) -> str:
        return text.split(f"[[ ## {name} ## ]]\n", 1)[1].split("\n", 1)[0]

    demos = [Trajectory.model_validate_json(line) for line in demos]
    judging = privileged_self_rows(PrivilegedCorrection, SelfExpert().adapter, demos, 60, random.Random(0),
                                   lambda *_: "A guess.")
    kept = [field(r["prompt"][-1]["content"], "student_action") == field(r["completion"][0]["content"], "action")
            for r in judging]
    assert any(kept) and not all(kept)
    config = (run / "config.yaml").read_text()
    assert "bc_expert_level: 3" in config


def test_a_reason_too_long_to_write_is_cut_until_the_answer_fits_the_budget(tiny_model: str) -> None:
    """An LM expert's reason that runs on would be cut off at play time before its action, so the student would
    learn a step it can never take: the row's reason is cut at a word, as little as fits `max_new_tokens`; the
    correction keeps it whole, and an answer whose action alone does not fit is counted and left whole."""
    student = Student()
    signature, adapter = student.step.signature, student.adapter
    inputs = StudentInputs(task="put a mug in shelf.", observation="You see a shelf 1.", history="(none)")
    long = "\n".join(f"Step {i}:  the mug is probably near the shelf, so I go there." for i in range(40))
    records = [Correction(task_id="a", step=n, inputs=inputs, reason=reason, action="go to shelf 1", expert="x",
                          student_reason="Look.", student_action="look") for n, reason in enumerate([long, "Short."])]
    fit = AnswerFit.of(tiny_model, 48)
    rows = sft_rows(signature, adapter, records, fit=fit)
    answers = [adapter.parse(signature, row["completion"][0]["content"]) for row in rows]
    assert fit.cut == 1 and all(fit.count(row["completion"][0]["content"]) <= 48 for row in rows)
    assert [a["action"] for a in answers] == ["go to shelf 1"] * 2 and answers[1]["reason"] == "Short."
    kept, ends = answers[0]["reason"], [m.end() for m in re.finditer(r"\S+", long)]
    assert kept and long.startswith(kept) and len(kept) in ends and records[0].reason == long  # after a word
    one_more = long[:ends[ends.index(len(kept)) + 1]]
    assert fit.count(adapter.format_assistant_message_content(signature, {"reason": one_more,
                                                                          "action": "go to shelf 1"})) > 48
    chosen = preference_rows(signature, adapter, records, kind="dpo", fit=fit)[0]["chosen"][0]["content"]
    assert chosen == rows[0]["completion"][0]["content"]  # the preferred side is cut the same way

    word = records[0].model_copy(update={"reason": "x" * 400})  # one long word: cut within it, not to nothing
    [row] = sft_rows(signature, adapter, [word], fit=fit)
    assert fit.count(row["completion"][0]["content"]) <= 48 and adapter.parse(
        signature, row["completion"][0]["content"])["reason"].startswith("xx")

    tight = AnswerFit.of(tiny_model, 3)
    assert adapter.parse(signature, sft_rows(signature, adapter, records[1:], fit=tight)[0]["completion"][0][
        "content"])["reason"] == "Short." and (tight.over, tight.cut) == (1, 0)


def test_rare_actions_are_repeated_within_the_same_row_budget() -> None:
    inputs = StudentInputs(task="t", observation="o", history="h")
    records = [Correction(task_id="a", step=n, inputs=inputs, reason="r", action=action, expert="x")
               for n, action in enumerate(["go to shelf 1"] * 60 + ["take mug 1 from shelf 1"] * 10
                                          + ["click[Buy Now]"] * 30)]
    kept = balance_by_action(records, 3, 200, random.Random(0))
    kinds = Counter(r.action.split()[0].split("[")[0] for r in kept)
    assert kinds == {"go": 60, "take": 30, "click": 60}  # 60/10 -> capped at 3; 60/30 -> 2
    budgeted = balance_by_action(records, 3, 100, random.Random(0))
    assert len(budgeted) == 100 and len({id(r) for r in budgeted}) < 100  # repeats survive the cut
    assert balance_by_action(records, 1, 1000, random.Random(0)) == records  # cap 1: the raw mix


def test_a_round_trains_on_every_new_correction_as_dagger_does() -> None:
    inputs = StudentInputs(task="t", observation="o", history="h")

    def records(task: str, n: int) -> list[Correction]:
        return [Correction(task_id=task, step=i, inputs=inputs, reason="r", action="go to shelf 1", expert="x")
                for i in range(n)]

    new, old = records("new", 90), records("old", 300)
    rows = aggregate_sft(new, old, 60, random.Random(0), 1, random.Random(1))
    assert len(rows) == 90 and {r.task_id for r in rows} == {"new"}  # past the budget: all new, no old
    rows = aggregate_sft(new[:20], old, 60, random.Random(0), 2, random.Random(1))
    assert len(rows) == 60 and sum(r.task_id == "new" for r in rows) == 20  # old ones fill the budget
    capped = aggregate_sft(new, old, 60, random.Random(0), 1, random.Random(1), all_new=False)
    assert sum(r.task_id == "new" for r in capped) == 30 and len(capped) == 60  # the half-budget variant
    rare = [Correction(task_id="old", step=300 + i, inputs=inputs, reason="r", action="take mug 1 from shelf 1",
                       expert="x") for i in range(60)]
    for all_new in (True, False):  # the earlier data that fills the round is balanced too, within the budget
        rows = aggregate_sft(new[:20], old + rare, 60, random.Random(0), 2, random.Random(1), all_new=all_new)
        takes = [r for r in rows if r.action.startswith("take")]
        assert len(rows) == 60 and {id(r) for r in new[:20]} <= {id(r) for r in rows}
        assert len({id(r) for r in takes}) < len(takes)  # a rare kind's records repeated


def test_a_run_can_start_from_another_runs_behaviour_cloning(env: ALFWorld, tiny_model: str,
                                                             tmp_path: Path) -> None:
    source = tmp_path / "bc"
    compile_tiny(env, tiny_model, source, iterations=0, evaluate_base=True)
    run = tmp_path / "dpo"
    leap = LEAP(env, iterations=1, update="dpo", model=tiny_model, run_dir=run, **FAST,
                lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False, bc_from=source,
                evaluate_base=True)
    leap.compile(Student(), trainset=env.tasks("train"), valset=env.tasks("seen") + env.tasks("unseen"))
    for name in ("base", "expert", "iter_0"):  # adopted as they were, not played or trained again
        assert (run / name / "metrics.json").read_text() == (source / name / "metrics.json").read_text()
    assert ((run / "iter_0" / "trajectories.jsonl").read_text()
            == (source / "iter_0" / "trajectories.jsonl").read_text())
    trained = json.loads((run / "iter_1" / "train.json").read_text())
    assert trained["method"] == "dpo"
    assert trained["learning_rate"] == TrainConfig().lr_for("dpo") == leap.config.iteration_learning_rate()
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["base", "expert", "0", "1"]

    with pytest.raises(ConfigMismatch, match="bc_epochs"):
        LEAP(env, iterations=1, model=tiny_model, run_dir=tmp_path / "other", **FAST,
             lm_kwargs={"max_new_tokens": 16}, bc_epochs=3.0, progress=False, bc_from=source).compile(
            Student(), trainset=env.tasks("train"), valset=env.tasks("seen") + env.tasks("unseen"))
    # Another privilege level shares the behaviour cloning, not the expert's own row: that plays at its level.
    level0 = tmp_path / "level0"
    LEAP(env, iterations=0, model=tiny_model, run_dir=level0, **FAST, privilege_level=0,
         lm_kwargs={"max_new_tokens": 16}, num_threads=4, progress=False, bc_from=source).compile(
        Student(), trainset=env.tasks("train"), valset=env.tasks("seen") + env.tasks("unseen"))
    def timings(run_dir: Path) -> list[float]:
        lines = (run_dir / "expert" / "eval.jsonl").read_text().splitlines()
        return [Trajectory.model_validate_json(line).wall_s for line in lines]

    assert timings(level0) and timings(level0) != timings(source)  # played again, not copied
    assert (level0 / "iter_0" / "metrics.json").read_text() == (source / "iter_0" / "metrics.json").read_text()
    with pytest.raises(ConfigMismatch, match="no finished behaviour cloning"):
        LEAP(env, iterations=1, model=tiny_model, run_dir=tmp_path / "third", **FAST,
             lm_kwargs={"max_new_tokens": 16}, progress=False, bc_from=tmp_path / "nowhere").compile(
            Student(), trainset=env.tasks("train"), valset=env.tasks("seen") + env.tasks("unseen"))


def test_a_kill_after_the_adapter_is_published_keeps_its_training_result(env: ALFWorld, tiny_model: str,
                                                                          tmp_path: Path) -> None:
    """The adapter and its TrainResult are published together: a kill before train.json and the stage's
    evaluation are written (simulated by removing them) resumes without training again and without a loss."""
    run = tmp_path / "run"
    compile_tiny(env, tiny_model, run)
    kept = json.loads((run / "iter_1" / "adapter" / "train_result.json").read_text())
    written = json.loads((run / "iter_1" / "train.json").read_text())  # the result, and what the rows cut
    assert kept == {k: v for k, v in written.items() if not k.startswith("answers_")}
    for name in ("train.json", "metrics.json", "eval.jsonl"):
        (run / "iter_1" / name).unlink()
    weights = (run / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    compile_tiny(env, tiny_model, run)
    assert (run / "iter_1" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == weights  # not retrained
    assert json.loads((run / "iter_1" / "train.json").read_text()) == written
    assert json.loads((run / "iter_1" / "metrics.json").read_text())["train_s"] == round(kept["wall_s"], 1)
