"""Where a compile's time went, by stage and by kind of work, from its run folder's `metrics.csv`.

Each stage row records its training and evaluation seconds and its wall time; the rest of a stage's wall is
playing (the expert's demonstrations before behaviour cloning, the student's rollouts in a round) and the
expert's corrections. The table shows each stage's split and the whole run's shares, so that the stage worth
speeding up is the first thing one reads. A stage finished after a resume counts only the process that
finished it. Where a stage's metrics.json records them (runs from 2026-11-30 on), evaluation is split further
into the model's generating and the rest (environment steps, DSPy's formatting and parsing, waiting), with
the answers the engine remembered instead of generating. Where a round's fine-tune trained beside the previous
stage's evaluation, those seconds count once, as that evaluation's, and the table shows them apart.

Usage: python bench/profile_run.py RUN_DIR [RUN_DIR ...] [--plot compile-time.png]
(`--plot`: one bar per run, its stages in order, each split by kind, so runs compare at a glance.)
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
    """A stage's seconds by kind, adding up to its wall; what training and evaluation do not account for is
    playing and correcting. Training counts only its seconds not spent beside the previous stage's evaluation
    (`overlap_s`), which that stage's evaluation already counts."""
    train, evaluate, wall, beside = (float(row.get(key) or 0.0) for key in ("train_s", "eval_s", "wall_s",
                                                                           "overlap_s"))
    train -= beside
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


def stage_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def profile(run: Path, rows: list[dict[str, str]]) -> Table:
    table = Table(title=f"{run.name}: seconds by stage")
    for column in ("stage", *KINDS, "trained beside eval", "of which generating", "remembered answers",
                   "wall"):
        table.add_column(column, justify="right")
    totals = dict.fromkeys(KINDS, 0.0)
    for row in rows:
        seconds = stage_seconds(row)
        for kind in KINDS:
            totals[kind] += seconds[kind]
        work = generation(run, row["iteration"])
        split = (f"{work[0]:.0f}", f"{work[1]}") if work else ("", "")
        beside = float(row.get("overlap_s") or 0.0)
        table.add_row(stage_name(row["iteration"]), *(f"{seconds[k]:.0f}" for k in KINDS),
                      f"{beside:.0f}" if beside else "", *split, f"{sum(seconds.values()):.0f}")
    whole = sum(totals.values()) or 1.0
    table.add_row("all", *(f"{totals[k]:.0f} ({100 * totals[k] / whole:.0f}%)" for k in KINDS), "", "", "",
                  f"{whole:.0f}", style="bold")
    return table


def plot(runs: dict[Path, list[dict[str, str]]], out: Path) -> None:
    """Minutes by stage and kind, one horizontal bar per run; a stage's three kinds share its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.7 * len(runs)))
    for y, rows in enumerate(runs.values()):
        left = 0.0
        for row in rows:
            seconds, start = stage_seconds(row), left
            for colour, kind in enumerate(KINDS):
                ax.barh(y, seconds[kind] / 60, height=0.55, left=left, color=f"C{colour}", edgecolor="white",
                        linewidth=0.5, label=kind if y == 0 and start == 0 else None)
                left += seconds[kind] / 60
            if left - start > 2:  # the expert's reference evaluation is too thin to label
                ax.text((start + left) / 2, y - 0.33, stage_name(row["iteration"]), ha="center", fontsize=8)
        ax.text(left + 0.3, y, f"{left:.0f} min", va="center", fontsize=9)
    ax.set_yticks(range(len(runs)), [f"{run.parent.name}/{run.name}" for run in runs])
    ax.set_ylim(len(runs) - 0.5, -0.75)  # the first run on top, with room for its stage labels
    ax.set(xlabel="minutes", title="where each compile's time went, stage by stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.margins(x=0.08)  # room for the totals
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with a metrics.csv)")
    parser.add_argument("--plot", type=Path, help="also draw the runs side by side into this PNG")
    args = parser.parse_args()
    console = Console()
    runs = {}
    for run in args.runs:
        if not (run / "metrics.csv").exists():
            raise SystemExit(f"error: {run} has no metrics.csv")
        runs[run] = stage_rows(run)
        console.print(profile(run, runs[run]))
    if args.plot:
        plot(runs, args.plot)
        console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
