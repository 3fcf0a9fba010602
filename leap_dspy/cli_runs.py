"""What the commands that use a finished run (`evaluate`, `rollout`, `compare`) load from it and print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from leap_dspy.cli_settings import build_env, env_tasks, fail
from leap_dspy.progress import console

if TYPE_CHECKING:
    from leap_dspy.runs import RunFolder


def load_run(run_dir: Path) -> tuple[dict[str, Any], Any]:
    from leap_dspy.run_config import read_config
    from leap_dspy.store import RunFileError

    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise fail(f"{run_dir} is not a run folder (no config.yaml)")
    try:
        config = read_config(config_path)
    except RunFileError as exc:
        raise fail(str(exc)) from exc
    env_options = dict(config["env"])
    return config, build_env(env_options.pop("name"), env_options)


def load_program(path: Path, lm: Any = None, settings: dict[str, Any] | None = None) -> Any:
    """A saved Student, loaded only if its LM state names nothing but leap-dspy's own engines and no endpoint:
    DSPy imports the engine class a file names, so an untrusted file must not choose it. With `lm`, the student
    acts with that instead of the engine its file records (whose adapter path is where the run was written)."""
    from leap_dspy.lm.engine import unsafe_lm_state, without_lms
    from leap_dspy.programs import Student

    if not path.exists():
        raise fail(f"no saved program at {path}")
    try:
        state = json.loads(path.read_text())
        problems = unsafe_lm_state(state)
    except (OSError, ValueError) as exc:
        raise fail(f"{path} is not a saved Student program: {exc}") from exc
    if problems:
        raise fail(f"refusing to load {path}: {problems[0]} (a student.json written by leap-dspy names only its "
                   "local engine)")
    if lm is not None and isinstance(state, dict):
        state = without_lms(state)
    try:
        student = Student(**(settings or {}))  # the settings its run recorded (history window, clipping, ...)
    except TypeError as exc:
        raise fail(f"{path}: its run recorded Student settings this leap-dspy does not take: {exc}") from exc
    try:
        student.load_state(state, allow_unsafe_lm_state=True)
    except FileNotFoundError as exc:  # the adapter it records is gone (`ModelNotFound`)
        raise fail(f"{path}: {str(exc).splitlines()[0]}") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise fail(f"{path} is not a saved Student program: {exc}") from exc
    if lm is not None:
        student.set_lm(lm)
    return student


def run_lm(run_dir: Path) -> Any:
    """The compiled student's LM from the run folder itself (its model, the adapter compile chose, its engine
    settings), wherever the folder has been moved or copied since `student.json` recorded a path."""
    from leap_dspy.lm import local_lm
    from leap_dspy.serve_target import resolve_target
    from leap_dspy.store import RunFileError

    try:
        model, adapter, engine = resolve_target(str(run_dir))
    except (RunFileError, ValueError) as exc:
        raise fail(str(exc)) from exc
    return local_lm(model, adapter=adapter, **engine)


def report_rollout(name: str, trajectories: list[Any], with_scores: bool = True) -> dict[str, Any]:
    """Each split's success (and score, where the environment reports one beside success) as a table."""
    from leap_dspy.metrics import split_metrics

    metrics = split_metrics(trajectories)
    columns = ("split", "episodes", "success", *(("score",) if with_scores else ()), "mean steps")
    table = Table(title=name)
    for column in columns:
        table.add_column(column, justify="right")
    for split in ("train", "seen", "unseen"):
        if f"{split}_episodes" in metrics:
            score = (f"{metrics[f'{split}_score']:.1f}",) if with_scores else ()
            table.add_row(split, str(metrics[f"{split}_episodes"]), f"{metrics[f'{split}_success']:.3f}", *score,
                          f"{metrics[f'{split}_steps']:.1f}")
    console.print(table)
    return metrics


def play_split(student: Any, environment: Any, split: str, threads: int, limit: int | None, title: str,
               out: Path | None = None, *, snap: bool | None = None, processes: int | None = None) -> None:
    """Play `split`'s tasks (the first `limit`) with `student` (`snap` overrides its `snap_actions`) in
    `processes` (unset: `Shards.of`'s default), print its success and write each episode to `out` (the run
    folder's eval.jsonl format, which `report`-style comparisons read)."""
    from leap_dspy.progress import progress_bar
    from leap_dspy.rollout import rollout

    if split not in ("train", "seen", "unseen"):
        raise fail(f"--split must be train, seen or unseen, not {split!r}")
    tasks = env_tasks(environment, split)[:limit]
    with progress_bar(f"rollout {split}", len(tasks)) as advance:
        trajectories = rollout(student, environment, tasks, num_threads=threads, snap=snap,
                               processes=processes,
                               on_trajectory=lambda _: advance())
    if out is not None:
        from leap_dspy.store import atomic_write_text

        atomic_write_text(out, "".join(t.model_dump_json() + "\n" for t in trajectories))
    report_rollout(title, trajectories, with_scores=environment.reports_score)


def print_metrics(run: RunFolder) -> None:
    """metrics.csv with a column per stage: a row per stage would be a dozen columns, cut to fit a terminal."""
    rows = list(run.summary_rows().values())
    if not rows:
        return
    table = Table(title=str(run.path / "metrics.csv"))
    table.add_column("")
    for row in rows:
        table.add_column(row["iteration"], justify="right")
    for column in rows[0]:
        if column != "iteration":
            table.add_row(column, *(row.get(column, "") for row in rows))
    console.print(table)
