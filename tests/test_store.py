from __future__ import annotations

from pathlib import Path

import pytest

from leap_dspy.runs import RunFolder
from leap_dspy.store import JsonlLog, RunFileError, atomic_write_json, read_json
from leap_dspy.types import Correction, StudentInputs


def correction(step: int, action: str = "look") -> Correction:
    inputs = StudentInputs(task="t", observation="o", history="h")
    return Correction(task_id="a", step=step, inputs=inputs, reason="r", action=action, expert="oracle")


def test_torn_tail_is_dropped_and_repaired(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "c.jsonl", Correction, key=lambda c: c.key)
    log.append(correction(0))
    log.append(correction(1))
    whole = (tmp_path / "c.jsonl").read_bytes()
    (tmp_path / "c.jsonl").write_bytes(whole + correction(2).model_dump_json().encode()[:25])  # killed mid-write
    records = log.load()
    assert sorted(records) == ["0:a:0", "0:a:1"]
    assert (tmp_path / "c.jsonl").read_bytes() == whole  # repaired, so the next append starts a clean line
    log.append(correction(2))
    assert sorted(log.load()) == ["0:a:0", "0:a:1", "0:a:2"]


def test_a_bad_line_mid_log_is_moved_aside_loudly_and_the_rest_kept(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.jsonl"
    log = JsonlLog(path, Correction, key=lambda c: c.key)
    for step in range(5):
        log.append(correction(step))
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "{not json\n"  # a disk error or a hand edit
    lines[3] = lines[3].replace('"reason"', '"renamed_field"')  # another version's record: valid JSON, bad schema
    path.write_text("".join(lines) + correction(5).model_dump_json()[:20])  # and a torn tail
    records = log.load()
    assert sorted(records) == ["0:a:0", "0:a:2", "0:a:4"]  # nothing after a bad line is lost
    assert (tmp_path / "c.jsonl.corrupt").read_text().splitlines() == [lines[1].strip(), lines[3].strip()]
    assert "2 unreadable line(s) (line 2, 4) moved to c.jsonl.corrupt" in capsys.readouterr().err.replace("\n", " ")
    assert sorted(log.load()) == ["0:a:0", "0:a:2", "0:a:4"]  # repaired on disk: the next load is quiet
    log.append(correction(1))
    assert sorted(log.load()) == ["0:a:0", "0:a:1", "0:a:2", "0:a:4"]


def test_one_record_per_key(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "c.jsonl", Correction, key=lambda c: c.key)
    log.append(correction(0, "look"))
    log.append(correction(0, "inventory"))
    records = log.load()
    assert len(records) == 1 and records["0:a:0"].action == "inventory"


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "m.json", {"x": 1})
    atomic_write_json(tmp_path / "m.json", {"x": 2})
    assert read_json(tmp_path / "m.json") == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_metrics_csv_rows_in_policy_order(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for name in ("iter_1", "expert", "iter_0", "base"):
        atomic_write_json(tmp_path / name / "metrics.json",
                          {"iteration": name.removeprefix("iter_"), "seen_success": 0.5, "unseen_success": 0.25,
                           "train_examples": 3, "wall_s": 1.0})
    text = run.write_metrics_csv().read_text().splitlines()
    assert text[0].startswith("iteration,seen_success,unseen_success")
    assert [line.split(",")[0] for line in text[1:]] == ["base", "expert", "0", "1"]
    report = run.write_report("test")
    assert report.exists() and (tmp_path / "learning_curve.png").exists()


def test_a_run_from_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A config.yaml written before a training setting existed ran as its default does: a resume that leaves
    the setting at its default goes on, one that changes it is refused."""
    import yaml

    from leap_dspy.config import LEAPConfig
    from leap_dspy.run_config import ConfigMismatch, start_run

    config = {"schema_version": 1, "env": {"name": "keybox"}, **LEAPConfig().dump()}
    older = {**config, "train": {k: v for k, v in config["train"].items() if k != "use_liger_kernel"}}
    older.pop("drop_unrealizable")
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.config_path.write_text(yaml.safe_dump(older))
    start_run(run, config)  # resumes: the missing settings are at their defaults
    assert yaml.safe_load(run.config_path.read_text())["train"]["use_liger_kernel"] is False
    run.config_path.write_text(yaml.safe_dump(older))
    changed = {**config, "train": {**config["train"], "use_liger_kernel": True}}
    with pytest.raises(ConfigMismatch, match="train"):
        start_run(run, changed)


def test_an_environment_option_added_since_a_run_started_resumes_at_its_default(tmp_path):
    """InterCode's `task_file` came after runs that recorded every other option: they resume, a set one does not."""
    import yaml

    from leap_dspy.config import LEAPConfig
    from leap_dspy.envs import make_env
    from leap_dspy.run_config import ConfigMismatch, start_run

    env = {"name": "intercode-sql", **make_env("intercode-sql").config()}
    config = {"schema_version": 1, "env": env, **LEAPConfig().dump()}
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    older = {**config, "env": {k: v for k, v in env.items() if k != "task_file"}}
    run.config_path.write_text(yaml.safe_dump(older))
    start_run(run, config)
    run.config_path.write_text(yaml.safe_dump(older))
    with pytest.raises(ConfigMismatch, match="env"):
        start_run(run, {**config, "env": {**env, "task_file": "/elsewhere/mine.json"}})


def test_a_run_decodes_as_it_ran(tmp_path):
    """Runs from before `ngram_repeats` never said a 12-token run twice: they resume and rerun so, or not at all."""
    import yaml

    from leap_dspy.config import LEAPConfig
    from leap_dspy.run_config import ConfigMismatch, read_config, start_run

    config = {"schema_version": 1, "env": {"name": "keybox"}, **LEAPConfig().dump()}
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.config_path.write_text(yaml.safe_dump({**config, "lm": {"no_repeat_ngram": 12}}))
    assert read_config(run.config_path)["lm"] == {"no_repeat_ngram": 12, "ngram_repeats": 1}
    with pytest.raises(ConfigMismatch, match="lm"):
        start_run(run, config)
    start_run(run, {**config, "lm": {"no_repeat_ngram": 12, "ngram_repeats": 1}})


_LAUNCHER = """
import os, subprocess, sys, time
from leap_dspy.runs import RunFolder, hold
from leap_dspy.train.launch import LAUNCHED_BY
lock = hold(RunFolder(sys.argv[1]))
child = "from leap_dspy.train.launch import _end_with_the_compile as end; {end}; import time; time.sleep(120)"
env = {**os.environ, LAUNCHED_BY: str(os.getpid())}
for end in ("end()", "None"):  # a fine-tune launched directly, and one whose own parent is not the compile
    process = subprocess.Popen([sys.executable, "-c", child.format(end=end)], env=env, pass_fds=(lock,))
    print(process.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_compile_leaves_its_run_folder_to_a_resume_or_refuses_it_clearly(tmp_path: Path) -> None:
    """A compile locks its run folder, and so do the fine-tunes it launches: one it started itself dies with it
    (`kill -9`), while one that outlives it (under another launcher) makes a resume refuse the folder, by name,
    until it ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from leap_dspy.runs import RunInUse, hold

    run = RunFolder(tmp_path / "run")
    compile_ = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(run.path)], stdout=subprocess.PIPE, text=True)
    direct, other = (int(compile_.stdout.readline()) for _ in range(2))  # type: ignore[union-attr]
    with pytest.raises(RunInUse, match="in use"):
        hold(run)
    time.sleep(2)  # the children have set themselves up
    os.kill(compile_.pid, signal.SIGKILL)
    compile_.wait()

    def alive(pid: int) -> bool:
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]

    deadline = time.time() + 10
    while alive(direct) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(direct), "the directly launched fine-tune outlived its compile"
    assert alive(other)
    with pytest.raises(RunInUse, match=str(run.path)):
        hold(run)
    os.kill(other, signal.SIGKILL)
    time.sleep(0.5)
    assert hold(run) == hold(run)  # now this process's, held once


def test_reading_a_run_for_a_report_changes_nothing_and_says_what_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report` and `compare` read eval logs: a torn one is read as far as it goes, with a warning that the
    stage's episodes are fewer than its metrics count, and the file is left as it was."""
    from leap_dspy.types import Task, Trajectory

    stage = tmp_path / "iter_1"
    stage.mkdir()
    atomic_write_json(stage / "metrics.json", {"iteration": "1", "unseen_success": 0.5, "unseen_episodes": 2})
    tasks = [Task(id=f"u{i}", env="e", split="unseen", instruction="go") for i in range(2)]
    lines = [Trajectory(task=t, policy="student", success=bool(i)).model_dump_json() + "\n"
             for i, t in enumerate(tasks)]
    torn = (lines[0] + lines[1][:40]).encode()
    (stage / "eval.jsonl").write_bytes(torn)
    rows = RunFolder(tmp_path).episodes()
    assert [row["task_id"] for row in rows] == ["u0"]
    assert (stage / "eval.jsonl").read_bytes() == torn
    said = " ".join(capsys.readouterr().err.split())
    assert "1 unreadable line(s) left out" in said and "holds 1 of the 2 episodes" in said


def test_a_finished_stages_episodes_survive_its_damaged_eval_log(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """episodes.csv is rewritten at each compile's end from the eval logs: where a finished stage's log is gone
    or torn (it is never played again), the table's own rows for the stage stand in rather than vanish."""
    from leap_dspy.types import Task, Trajectory

    run, stage = RunFolder(tmp_path), tmp_path / "iter_1"
    stage.mkdir()
    atomic_write_json(stage / "metrics.json", {"iteration": "1", "unseen_success": 0.5, "unseen_episodes": 2})
    lines = [Trajectory(task=Task(id=f"u{i}", env="e", split="unseen", instruction="go"), policy="student",
                        success=bool(i)).model_dump_json() + "\n" for i in range(2)]
    (stage / "eval.jsonl").write_text("".join(lines))
    run.write_episodes_csv()
    for damage in ("".join(lines)[:-30], None):  # torn, then deleted
        (stage / "eval.jsonl").unlink(missing_ok=True)
        if damage is not None:
            (stage / "eval.jsonl").write_text(damage)
        run.write_episodes_csv()
        assert [(r["task_id"], r["success"]) for r in run.episodes()] == [("u0", "0"), ("u1", "1")]
    assert "episodes.csv's 2 stand in" in " ".join(capsys.readouterr().err.split())


def test_finished_stages_without_a_config_are_not_adopted_into_a_new_configuration(tmp_path: Path) -> None:
    """A folder whose config.yaml was lost cannot say what made its stages: a compile of any configuration
    would have adopted them as its own."""
    from leap_dspy.config import LEAPConfig
    from leap_dspy.run_config import start_run

    run = RunFolder(tmp_path / "run")
    run.stage(0).mkdir(parents=True, exist_ok=True)
    (run.stage(0) / "metrics.json").write_text('{"iteration": "0"}')
    with pytest.raises(RunFileError, match=r"finished stages \(iter_0\) but no config.yaml"):
        start_run(run, {"schema_version": 1, "env": {"name": "keybox"}, **LEAPConfig().dump()})
    assert not run.config_path.exists()


def test_a_finished_stages_records_cut_short_are_refused_not_trained_on(tmp_path: Path) -> None:
    """Later rounds aggregate every earlier stage's records, which a finished stage never makes again: a log cut
    below the count its metrics.json recorded stops the compile instead of training on less."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.keybox import KeyBox
    from leap_dspy.teleprompt import LEAP

    leap = LEAP(KeyBox(), run_dir=tmp_path / "run")
    record = Correction(task_id="t", step=0, inputs=StudentInputs(task="go", observation="here", history=""),
                        reason="r", action="a", student_reason="r", student_action="a", expert="x", iteration=0,
                        level=1)
    leap.run.stage(0).mkdir(parents=True, exist_ok=True)
    JsonlLog(leap.run.stage(0) / "corrections.jsonl", Correction, key=lambda c: c.key).append(record)
    assert len(leap.run.corrections(0)) == 1  # not finished: whatever is missing is made again on resume
    atomic_write_json(leap.run.stage(0) / "metrics.json", {"iteration": "0", "corrections": 3})
    with pytest.raises(RunFileError, match="holds 1 of the 3 records its finished stage counted"):
        leap.run.corrections(0)
