"""A stage's evaluation and the next round's rollouts with the same weights: one after the other, as a compile
plays them where no fine-tune runs beside the evaluation, and at once, each job's live episodes counted by the
engine (`expected`), so that the rollouts' few episodes ride in the evaluation's batches instead of stepping in
small batches of their own. Whether that pays depends on what a small batch costs: on a float32 CPU, where drafts
fill a small batch's step, it did not (docs/performance.md), so compiles keep the two apart.

The evaluation is the compile's (the validation tasks, strict, 64 at once); the rollouts are round 1's (a seeded
sample of the training tasks, ended once stuck, recording what the scripted expert reads). Each way runs once,
in the order given, in one process with one engine; the table gives each way's wall, environment steps and
seconds generating, and how many episodes played the same actions both ways (batches of other sizes may flip
a near-tie).

Usage: python bench/beside_rollouts.py --adapter RUN/iter_1/adapter [--eval-tasks 65] [--rollout-tasks 12]
           [--max-steps 20] [--max-batch 96] [--ways apart together]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from leap_dspy.config import LEAPConfig  # noqa: E402
from leap_dspy.envs.alfworld import ALFWorld  # noqa: E402
from leap_dspy.lm import DEFAULT_MODEL, local_lm  # noqa: E402
from leap_dspy.programs import Student  # noqa: E402
from leap_dspy.rollout import (  # noqa: E402
    ROLLOUT_MAX_STUCK,
    engine_counters,
    rollout_samples,
    round_seed,
    run_parallel,
    student_policy,
)
from leap_dspy.types import Trajectory  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=None, help="the student's adapter (default: the base weights)")
    parser.add_argument("--eval-tasks", type=int, default=65, help="validation tasks: unseen first, then seen")
    parser.add_argument("--rollout-tasks", type=int, default=12)
    parser.add_argument("--max-steps", type=int, default=None, help="default: the environment's (20)")
    parser.add_argument("--max-batch", type=int, default=None, help="the engine's largest batch (default: the "
                        "compile's, 64); above the evaluation's 64 episodes the rollouts' rows fit beside them")
    parser.add_argument("--ways", nargs="+", choices=("apart", "together"), default=["apart", "together"])
    return parser.parse_args()


def play(student: Student, env: ALFWorld, jobs: dict[str, tuple[Any, list]], together: bool
         ) -> tuple[dict[str, list[Trajectory]], dict[str, float]]:
    """Each job's episodes, 64 at a time, the jobs one after the other or in threads of their own at once."""
    played: dict[str, list[Trajectory]] = {}
    walls: dict[str, float] = {}

    def one(name: str) -> None:
        started = time.perf_counter()
        policy, tasks = jobs[name]
        played[name] = run_parallel(policy, env, tasks, num_threads=64, program=student)
        walls[name] = time.perf_counter() - started

    if not together:
        for name in jobs:
            one(name)
        return played, walls
    threads = [threading.Thread(target=one, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return played, walls


def main() -> None:
    args = parse_args()
    env = ALFWorld()
    config = LEAPConfig().for_env(env)
    student = Student()
    lm = {**config.lm, **({"max_batch": args.max_batch} if args.max_batch else {})}
    student.set_lm(local_lm(DEFAULT_MODEL, adapter=args.adapter, **lm))
    valset = (env.tasks("unseen") + env.tasks("seen"))[: args.eval_tasks]
    sample = next(rollout_samples(env.tasks("train"), args.rollout_tasks, round_seed(config.seed, 1)))
    limit = args.max_steps
    jobs = {"evaluation": (student_policy(student, policy="eval", snap=False, max_steps=limit), valset),
            "rollouts": (student_policy(student, capture_level=None, capture_oracle=True, policy="rollout",
                                        max_steps=limit, max_stuck=ROLLOUT_MAX_STUCK), sample)}
    table = Table(title=f"evaluation ({len(valset)} episodes) and rollouts ({len(sample)}), max {args.max_steps} "
                        f"steps, max_batch {lm.get('max_batch', 64)}, adapter={args.adapter}")
    for column in ("way", "wall s", "evaluation s", "rollouts s", "env steps", "steps/s", "generating s",
                   "eval success", "same actions"):
        table.add_column(column, justify="right")
    first: dict[str, list[str]] = {}
    for way in args.ways:
        student.step.lm.engine._answers.clear()  # each way generates its own answers, none remembered from before
        before = engine_counters(student)["generate_s"]
        started = time.perf_counter()
        played, walls = play(student, env, jobs, together=way == "together")
        wall = time.perf_counter() - started
        episodes = [t for name in jobs for t in played[name]]
        actions = {f"{t.policy}:{t.task.id}": [s.action for s in t.steps] for t in episodes}
        same = sum(actions[key] == first[key] for key in actions) if first else len(actions)
        first = first or actions
        steps = sum(len(t.steps) for t in episodes)
        success = sum(t.success for t in played["evaluation"]) / len(played["evaluation"])
        table.add_row(way, f"{wall:.1f}", f"{walls['evaluation']:.1f}", f"{walls['rollouts']:.1f}", str(steps),
                      f"{steps / wall:.2f}", f"{engine_counters(student)['generate_s'] - before:.1f}",
                      f"{success:.3f}", f"{same}/{len(actions)}")
        Console(width=160).print(table)


if __name__ == "__main__":
    main()
