"""Fine-tuning on several processes: a LEAP round trained by 2 processes (torchrun, gloo, on this CPU) against the
same round in one process, with the same global batch: the same number of steps and the same losses within
2%, the data order being the only difference (each process reads its share). And the default, one fresh
process per fine-tune, trains exactly as the compile's own process would."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from leap_dspy.config import LEAPConfig
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.teleprompt import LEAP
from leap_dspy.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.keybox import KeyBox  # noqa: E402

TINY = {"num_boxes": 3, "num_train": 4, "num_seen": 1, "num_unseen": 1, "max_steps": 8}


def compile_round(model: str, run: Path, per_device: int, launcher: list[str], iterations: int = 1) -> dict:
    """Behaviour cloning's fine-tune (`iterations` rounds after it) launched by `launcher`: its train.json."""
    env = KeyBox(**TINY)
    train = TrainConfig(max_length=512, per_device_batch_size=per_device, gradient_accumulation=1,
                        progress_bar=False)
    leap = LEAP(env, iterations=iterations, model=model, run_dir=run, train_config=train, num_threads=4,
                progress=False, lm_kwargs={"max_new_tokens": 16}, evaluate_base=False, evaluate_expert=False,
                train_launcher=launcher)
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))
    return json.loads((run / "iter_0" / "train.json").read_text())


def test_two_processes_train_as_one_does(tiny_model: str, tmp_path: Path) -> None:
    one = compile_round(tiny_model, tmp_path / "one", 8, [], iterations=0)
    two = compile_round(tiny_model, tmp_path / "two", 4, ["torchrun", "--nproc_per_node", "2"])
    rows = (tmp_path / "one" / "iter_0" / "train_rows.jsonl").read_bytes()
    assert rows == (tmp_path / "two" / "iter_0" / "train_rows.jsonl").read_bytes()  # the same data
    assert one["steps"] == two["steps"] > 1
    for a, b in zip(one["loss_history"], two["loss_history"], strict=True):
        assert abs(a - b) <= 0.02 * abs(a), (one["loss_history"], two["loss_history"])
    assert (tmp_path / "two" / "iter_1" / "adapter" / "adapter_config.json").exists()  # a round after it, too
    assert "torchrun" in (tmp_path / "two" / "iter_0" / "launch.sh").read_text()
    assert not list((tmp_path / "two" / "iter_0").glob("adapter.rank*"))  # other ranks' scratch is gone


def test_the_default_fresh_process_trains_exactly_as_the_compiles_own_would(tiny_model: str, tmp_path: Path) -> None:
    inside = compile_round(tiny_model, tmp_path / "inside", 8, [], iterations=0)
    fresh = compile_round(tiny_model, tmp_path / "fresh", 8, LEAPConfig().train_launcher, iterations=0)
    assert fresh["loss_history"] == inside["loss_history"] and fresh["steps"] == inside["steps"]
    assert inside["host_rss_mb"] is None and fresh["host_rss_mb"] > 0  # the compile's memory beside the trainer
    assert (tmp_path / "fresh" / "iter_0" / "launch.sh").read_text().startswith(sys.executable)


def test_an_evaluation_runs_beside_the_next_fine_tune_and_is_counted_once(tiny_model: str, tmp_path: Path) -> None:
    """Behaviour cloning's evaluation runs while round 1's launched trainer trains (they do not depend on each
    other), the cores split between them; every stage is still evaluated, and the stages' walls add up to no
    more than the compile's, the shared seconds counted once."""
    import time

    import torch

    env, run = KeyBox(**TINY), tmp_path / "beside"
    torch.set_num_threads(2)  # a share for each side
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=run, num_threads=4, progress=False,
                train_config=TrainConfig(max_length=512, progress_bar=False), lm_kwargs={"max_new_tokens": 16},
                evaluate_base=False, evaluate_expert=False, evaluate_beside_training=True)
    started = time.perf_counter()
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))
    wall = time.perf_counter() - started
    metrics = [json.loads((run / f"iter_{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert all(m["seen_episodes"] == 1 and m["unseen_episodes"] == 1 for m in metrics)
    assert metrics[1]["overlap_s"] > 0  # behaviour cloning's evaluation ran while round 1 trained
    assert "overlap_s" not in metrics[0]  # nothing ran beside behaviour cloning's own fine-tune
    assert sum(m["wall_s"] for m in metrics) <= wall
    assert (run / "iter_1" / "train_threads").read_text() == "2"  # the trainer was given every core at the end
    assert not (run / "iter_0" / "train_threads").exists()
    assert torch.get_num_threads() == 2
    assert "iter_1" in (run / "student.json").read_text()

    (run / "iter_0" / "metrics.json").unlink()  # a resume owes behaviour cloning's evaluation again
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))
    assert json.loads((run / "iter_0" / "metrics.json").read_text())["unseen_episodes"] == 1
    saved = (run / "student.json").read_text()
    assert "iter_1" in saved and "iter_0" not in saved  # the round's weights, not the ones evaluated last
