"""The scale-out checks of docs/scaling.md as numbers: a round trained by one process and by two (torchrun, gloo)
with the same global batch, and a pool of two `leap-dspy serve` processes with one killed mid-rollout.

    python bench/scale_out.py [--episodes 12]

Uses the tests' tiny random model and keybox set-up (tests/test_distributed.py, tests/test_pool.py), so that the
numbers are those of the checks CI runs. Prints two tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from leap_dspy.lm.models import build_tiny_model  # noqa: E402


def print_table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def training_table(model: str, tmp: Path) -> None:
    import test_distributed

    rows = []
    for name, per_device, launcher in (("1", 8, []), ("2 (torchrun, gloo)", 4, ["torchrun", "--nproc_per_node", "2"])):
        train = test_distributed.compile_round(model, tmp / name.split()[0], per_device, launcher)
        rows.append((name, str(train["steps"]), ", ".join(f"{x:.4f}" for x in train["loss_history"]),
                     f"{train['wall_s']:.1f}"))
    print_table("one round's fine-tune, the same global batch (8)", ("processes", "steps", "losses", "train s"), rows)


def pool_table(model: str, tmp: Path, episodes: int) -> None:
    import test_pool

    from leap_dspy.lm.pool import ServerPool
    from leap_dspy.programs import Student
    from leap_dspy.rollout import rollout

    servers = [test_pool.start_server(model) for _ in range(2)]
    (_, url1), (second, url2) = servers
    try:
        pool = ServerPool([url1, url2], cooldown_s=600)
        pool.load_adapter("round-1", str(test_pool.random_adapter(model, tmp / "adapter")))
        student = Student()
        student.set_lm(pool.lm("round-1", max_tokens=16))
        env = test_pool.KeyBox(**{**test_pool.TINY, "num_train": episodes})
        tasks = env.tasks("train")

        def kill_second(_: object) -> None:
            if second.poll() is None and pool.requests[url2] >= 3:
                second.kill()

        played = rollout(student, env, tasks, num_threads=4, on_trajectory=kill_second)
    finally:
        for process, _ in servers:
            process.kill()
    print_table("rollouts through two servers, the second killed after its third request",
                ("episodes asked", "completed", "steps", "requests (first, second)", "failed", "retried"),
                [(str(len(tasks)), str(len(played)), str(sum(len(t.steps) for t in played)),
                  f"{pool.requests[url1]}, {pool.requests[url2]}", str(sum(pool.failures.values())),
                  str(pool.retried))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=12, help="keybox episodes played through the pool")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scale-out-") as name:
        tmp = Path(name)
        model = str(build_tiny_model(tmp / "tiny"))
        training_table(model, tmp)
        pool_table(model, tmp, args.episodes)


if __name__ == "__main__":
    main()
