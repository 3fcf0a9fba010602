"""Peak memory and time of one evaluation (a saved student on an environment's split) under several KV budgets.

Each budget runs in a fresh process: what a process keeps after freeing memory is its own (glibc's heaps), so
runs in one process would inherit each other's pieces. The table shows each run's peak resident memory
(Linux's VmHWM), its wall time, environment steps and success, and how many batches the engine ran and split,
so that a budget's memory and its speed read side by side. Budgets split the same call into other batches, and
in bf16 that can flip near-ties: compare the seconds per step, not only the wall.

Usage: python bench/eval_memory.py RUN/student.json --env webshop [--split unseen] [--limit 60]
           [--budgets 0 256 512] [--repeats 1] [--threads 64]
(budget 0: the engine's default, `default_kv_budget` in `leap_dspy/lm/generate.py`; budgets in MiB.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def with_budget(program: Path, budget_mb: int) -> Path:
    """A copy of the saved program whose engines carry `kv_budget_mb` (0: the default)."""
    state = json.loads(program.read_text())
    for lm in (value.get("lm") for value in state.values() if isinstance(value, dict)):
        for key in ("engine", "async_engine"):
            if isinstance(lm, dict) and isinstance(lm.get(key), dict):
                lm[key]["state"]["kv_budget_mb"] = budget_mb or None
    out = Path(tempfile.mkdtemp(prefix="eval_memory_")) / "student.json"
    out.write_text(json.dumps(state))
    return out


def child(args: argparse.Namespace) -> None:
    """One evaluation in this process; its measurements as one JSON line on stdout."""
    from leap_dspy.cli_runs import load_program
    from leap_dspy.cli_settings import build_env
    from leap_dspy.rollout import rollout
    from leap_dspy.train.common import peak_rss_mb, rss_mb

    student = load_program(with_budget(args.program, args.child))
    environment = build_env(args.env, {})
    tasks = environment.tasks(args.split)[: args.limit]
    engine = student.step.lm.engine
    start = time.perf_counter()
    trajectories = rollout(student, environment, tasks, num_threads=args.threads)
    wall = time.perf_counter() - start
    stats = engine.stats
    print(json.dumps({
        "budget": args.child, "wall_s": wall, "peak_mb": peak_rss_mb(), "end_mb": rss_mb(),
        "episodes": len(trajectories), "steps": sum(len(t.steps) for t in trajectories),
        "success": sum(t.success for t in trajectories) / max(1, len(trajectories)),
        "batches": stats.batches, "kv_groups": stats.extra.get("kv_groups", 0),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program", type=Path, help="a saved Student program (a run's student.json)")
    parser.add_argument("--env", default="alfworld")
    parser.add_argument("--split", default="unseen")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=64, help="episodes at once (compile's default)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 256, 512], help="MiB; 0: the default")
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per budget, alternated")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    rows = []
    for _ in range(args.repeats):
        for budget in args.budgets:
            command = [sys.executable, __file__, str(args.program), "--env", args.env, "--split", args.split,
                       "--threads", str(args.threads), "--child", str(budget)]
            if args.limit:
                command += ["--limit", str(args.limit)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"budget {budget}: the evaluation failed\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            Console(stderr=True).print(f"budget {budget or 'default'}: {rows[-1]}")
    table = Table(title=f"{args.program} on {args.env}/{args.split}: one evaluation per fresh process")
    for column in ("KV budget", "wall s", "steps", "s / step", "peak GB", "success", "batches", "split into"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['budget']} MiB" if row["budget"] else "default", f"{row['wall_s']:.1f}",
                      str(row["steps"]), f"{row['wall_s'] / max(1, row['steps']):.3f}", f"{row['peak_mb'] / 1024:.2f}",
                      f"{row['success']:.3f}", str(row["batches"]), str(row["kv_groups"]))
    Console().print(table)


if __name__ == "__main__":
    main()
