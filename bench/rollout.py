"""Environment steps per second for three ways of running the same student on the same ALFWorld tasks:

1. leap-dspy's batched rollouts (one thread per episode, the engine batching their requests in lockstep);
2. one episode at a time (the same engine, batch 1);
3. the peer a DSPy user would reach for: the same program under `dspy.Evaluate(num_threads=8)`, over the
   same local model with one generate per request (no cross-request batching).

The batched run plays `--tasks` episodes at once; the two slower ways play fewer (`--sequential-tasks`,
`--peer-tasks`) of the same tasks, so that the benchmark ends in minutes: the rates compared are per
environment step, with the same weights, prompts and step limit.

Usage: python bench/rollout.py [--tasks 64] [--adapter runs/x/iter_2/adapter] [--max-steps 10]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dspy  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from leap_dspy.envs.alfworld import ALFWorld  # noqa: E402
from leap_dspy.lm import DEFAULT_MODEL, local_lm  # noqa: E402
from leap_dspy.programs import Student  # noqa: E402
from leap_dspy.rollout import rollout  # noqa: E402


class Episode(dspy.Module):
    """One whole episode as a DSPy program, so that `dspy.Evaluate` can run it."""

    def __init__(self, student: Student, env: ALFWorld, max_steps: int) -> None:
        super().__init__()
        self.student = student
        self.env = env
        self.max_steps = max_steps

    def forward(self, task):  # noqa: ANN001, ANN201 - DSPy program signature
        env = self.env.clone()
        trajectory = self.student.run(env, task, max_steps=self.max_steps)
        return dspy.Prediction(success=trajectory.success, steps=len(trajectory.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=64, help="episodes played at once (compile's --threads default)")
    parser.add_argument("--peer-tasks", type=int, default=16, help="tasks for the dspy.Evaluate run")
    parser.add_argument("--split", default="train")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (default: the untrained model)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--sequential-tasks", type=int, default=4, help="tasks for the one-at-a-time run")
    args = parser.parse_args()

    env = ALFWorld()
    tasks = env.tasks(args.split)[: args.tasks]
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    results: list[tuple[str, int, float]] = []

    def timed(name: str, lm: dspy.LM, run) -> None:  # noqa: ANN001
        student = Student(max_invalid_streak=0)
        student.set_lm(lm)
        with dspy.context(adapter=adapter):
            start = time.perf_counter()
            steps = run(student)
            results.append((name, steps, time.perf_counter() - start))

    batched_lm = local_lm(DEFAULT_MODEL, adapter=args.adapter, max_batch=64)
    # warm up the model (first calls pay one-off costs)
    timed("warm-up", batched_lm, lambda s: sum(len(t.steps) for t in rollout(s, env, tasks[:2], num_threads=2)))
    results.clear()

    def batched(student: Student) -> int:
        trajectories = rollout(student, env, tasks, num_threads=len(tasks), max_steps=args.max_steps)
        return sum(len(t.steps) for t in trajectories)

    timed(f"batched rollouts ({len(tasks)} episodes at once)", batched_lm, batched)

    single_lm = local_lm(DEFAULT_MODEL, adapter=args.adapter, batching=False)

    def one_at_a_time(student: Student) -> int:
        return sum(len(student.run(env.clone(), t, max_steps=args.max_steps).steps)
                   for t in tasks[: args.sequential_tasks])

    timed(f"one episode at a time ({args.sequential_tasks} episodes)", single_lm, one_at_a_time)

    def dspy_evaluate(student: Student) -> int:
        program = Episode(student, env, args.max_steps)
        devset = [dspy.Example(task=t).with_inputs("task") for t in tasks[: args.peer_tasks]]
        steps = [0]

        def metric(example, prediction, trace=None):  # noqa: ANN001, ANN201
            steps[0] += prediction.steps
            return float(prediction.success)

        dspy.Evaluate(devset=devset, metric=metric, num_threads=8, display_progress=False)(program)
        return steps[0]

    timed(f"dspy.Evaluate(num_threads=8), {min(args.peer_tasks, len(tasks))} episodes", single_lm, dspy_evaluate)

    peer = next(r for r in results if r[0].startswith("dspy.Evaluate"))
    peer_rate = peer[1] / peer[2]
    table = Table(title=f"ALFWorld rollouts, {DEFAULT_MODEL}, adapter={args.adapter}, max {args.max_steps} steps")
    for column in ("method", "env steps", "wall s", "steps/s", "x dspy.Evaluate"):
        table.add_column(column, justify="right")
    for name, steps, wall in results:
        rate = steps / wall
        table.add_row(name, str(steps), f"{wall:.1f}", f"{rate:.2f}", f"{rate / peer_rate:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
