"""Where a compile's time went, by stage and by kind of work, from its run folder's `metrics.csv`.

Each stage row records its training and evaluation seconds and its wall time; the rest of a stage's wall is
playing (the expert's demonstrations before behaviour cloning, the student's rollouts in a round) and the
expert's corrections. The table shows each stage's split and the whole run's shares, so that the stage worth
speeding up is the first thing one reads. A stage finished after a resume counts only the process that
finished it. Where a stage's metrics.json records them (runs from 2026-11-30 on), evaluation is split further
into the model's generating and the rest (environment steps, DSPy's formatting and parsing, waiting), with
the answers the engine remembered instead of generating.

Usage: python bench/profile_run.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

KINDS = ("play + correct", "train", "evaluate")


def stage_seconds(row: dict[str, str]) -> dict[str, float]:
    """A stage's seconds by kind; what training and evaluation do not account for is playing and correcting."""
    train, evaluate, wall = (float(row.get(key) or 0.0) for key in ("train_s", "eval_s", "wall_s"))
    return {"play + correct": max(wall - train - evaluate, 0.0), "train": train, "evaluate": evaluate}


def generation(run: Path, iteration: str) -> tuple[float, int] | None:
    """(seconds generating, answers remembered) while the stage evaluated, if its metrics.json says."""
    folder = run / (iteration if iteration in ("base", "expert") else f"iter_{iteration}")
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if "eval_generate_s" not in metrics:
        return None
    return float(metrics["eval_generate_s"]), int(metrics.get("eval_remembered", 0))


def stage_name(iteration: str) -> str:
    return {"0": "BC", "base": "base", "expert": "expert"}.get(iteration, f"round {iteration}")


def profile(run: Path) -> Table:
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    table = Table(title=f"{run.name}: seconds by stage")
    for column in ("stage", *KINDS, "of which generating", "remembered answers", "wall"):
        table.add_column(column, justify="right")
    totals = dict.fromkeys(KINDS, 0.0)
    for row in rows:
        seconds = stage_seconds(row)
        for kind in KINDS:
            totals[kind] += seconds[kind]
        work = generation(run, row["iteration"])
        split = (f"{work[0]:.0f}", f"{work[1]}") if work else ("", "")
        table.add_row(stage_name(row["iteration"]), *(f"{seconds[k]:.0f}" for k in KINDS), *split,
                      f"{sum(seconds.values()):.0f}")
    whole = sum(totals.values()) or 1.0
    table.add_row("all", *(f"{totals[k]:.0f} ({100 * totals[k] / whole:.0f}%)" for k in KINDS), "", "",
                  f"{whole:.0f}", style="bold")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with a metrics.csv)")
    console = Console()
    for run in parser.parse_args().runs:
        if not (run / "metrics.csv").exists():
            raise SystemExit(f"error: {run} has no metrics.csv")
        console.print(profile(run))


if __name__ == "__main__":
    main()
