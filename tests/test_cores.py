"""The cores split between this process's generation and a launched trainer (`leap_dspy.cores`): each side
takes up its share at its next unit of work, and whichever is still working gets every core when the other ends."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leap_dspy.cores import TRAIN_THREADS, SharedCores, follow_generation_share, trainer_callbacks  # noqa: E402


@pytest.fixture
def two_threads() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_generation_takes_every_core_once_the_trainer_ends(tmp_path: Path, two_threads: object) -> None:
    cores = SharedCores(tmp_path)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"], env=cores.environ())
    seen: list[tuple[int, str]] = []

    def evaluate() -> None:  # generating on a thread of its own, as the engine's batcher does
        def generate() -> None:
            follow_generation_share()
            seen.append((torch.get_num_threads(), (tmp_path / "train_threads").read_text()))

        for pause in (0.0, 2.0):
            time.sleep(pause)
            worker = threading.Thread(target=generate)
            worker.start()
            worker.join()

    shared = cores.run(evaluate, trainer)
    assert seen == [(1, "1"), (2, "1")]  # half the cores while the trainer ran, all of them after
    assert 0.5 < shared < 1.9  # the seconds the two ran side by side: about the trainer's second
    assert (tmp_path / "train_threads").read_text() == "2" and torch.get_num_threads() == 2
    trainer.wait()


class Worker:
    """One long-lived thread running what it is given, as the engine's batcher runs each generate call."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            job, done = self.jobs.get()
            done.put(job())

    def __call__(self, job: Callable[[], int]) -> int:
        done: queue.Queue = queue.Queue()
        self.jobs.put((job, done))
        return done.get()


def test_the_trainer_takes_every_core_once_the_evaluation_ends(tmp_path: Path, two_threads: object,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cores = SharedCores(tmp_path)
    monkeypatch.setenv(TRAIN_THREADS, cores.environ()[TRAIN_THREADS])
    (follow,) = trainer_callbacks()
    trainer, engine = Worker(), Worker()  # each keeps its own thread count, as torch does per OS thread

    def trainer_step() -> int:
        follow.on_step_begin(None, None, None)
        return torch.get_num_threads()

    def generate() -> int:
        follow_generation_share()
        return torch.get_num_threads()

    assert engine(torch.get_num_threads) == 2  # the engine's thread, started before the share
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    steps, calls = [trainer(trainer_step)], []
    assert cores.run(lambda: calls.append(engine(generate)), sleeper) < 1.0  # the evaluation ended first
    sleeper.kill()
    steps.append(trainer(trainer_step))
    calls.append(engine(generate))  # the engine's thread goes back to its own count, not left at its share
    assert steps == [1, 2] and calls == [1, 2]


def test_a_multi_process_trainer_splits_its_share_among_its_ranks(tmp_path: Path, two_threads: object,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cores = SharedCores(tmp_path)
    monkeypatch.setenv(TRAIN_THREADS, cores.environ()[TRAIN_THREADS])
    (tmp_path / "train_threads").write_text("4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    (follow,) = trainer_callbacks()
    (capped,) = trainer_callbacks(most=1)

    def step(callback: Any) -> int:
        callback.on_step_begin(None, None, None)
        return torch.get_num_threads()

    assert Worker()(lambda: step(follow)) == 2 and Worker()(lambda: step(capped)) == 1


def test_without_a_share_the_trainer_keeps_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRAIN_THREADS, raising=False)
    assert trainer_callbacks() == []


def test_an_evaluation_runs_beside_a_fine_tune_only_within_the_memory_budget(
        tmp_path: Path, two_threads: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside a fine-tune an evaluation runs where the last trainer's peak and the compile's fit the budget;
    a little over, with its KV cache capped by the excess; further over (the cap under the weights), first."""
    import dspy

    from examples.keybox import KeyBox
    from leap_dspy.config import LEAPConfig
    from leap_dspy.lm import get_engine
    from leap_dspy.lm.registry import loaded_generators
    from leap_dspy.placement import Placement
    from leap_dspy.train import TrainResult
    from leap_dspy.train.common import RESULT_FILE, machine_memory_mb, peak_rss_mb

    def trained(peak_mb: float) -> Path:
        adapter = tmp_path / f"peak{peak_mb:.0f}"
        adapter.mkdir(exist_ok=True)
        result = TrainResult(method="sft", adapter_dir=str(adapter), train_rows=1, train_tokens=1, steps=1,
                             wall_s=1.0, tokens_per_s=1.0, final_loss=None, loss_history=[], peak_rss_mb=peak_mb)
        (adapter / RESULT_FILE).write_text(result.model_dump_json())
        return adapter

    config = LEAPConfig()
    assert config.memory_budget_mb(24 * 1024) == 8 * 1024 and config.memory_budget_mb(12 * 1024) == 6 * 1024
    assert LEAPConfig(memory_budget_gb=20).memory_budget_mb(12 * 1024) == 20 * 1024
    engine = get_engine(config.model, None, **config.lm)  # the engine the student acts with
    generator = next(g for g in loaded_generators() if g.model is engine.hf_model)
    weights_mb = generator.weight_bytes / 2**20
    generator.stats.peak_kv_bytes = int((weights_mb + 300) * 2**20)  # as if a batch had held this much
    monkeypatch.setattr("leap_dspy.placement.loaded_generators", lambda: [generator])  # other tests' aside
    room = config.memory_budget_mb(machine_memory_mb()) - peak_rss_mb()
    placement = Placement(config, KeyBox(num_train=1, num_seen=1, num_unseen=1), "run")
    monkeypatch.setattr("leap_dspy.placement.idle_bf16_cores", lambda: False)
    assert not placement.beside_training(trained(room - 100))  # a float32 CPU: both sides are busy computing
    monkeypatch.setattr("leap_dspy.placement.idle_bf16_cores", lambda: True)
    assert placement.beside_training(trained(room - 101)) and placement.kv_cap_mb is None
    assert placement.beside_training(trained(room + 100))
    assert placement.kv_cap_mb is not None and abs(placement.kv_cap_mb - (weights_mb + 200)) <= 2
    capped = get_engine(config.model, None, **{**config.lm, "kv_budget_mb": placement.kv_cap_mb})
    assert capped.hf_model is engine.hf_model  # the cap is the engine's setting, over the same loaded weights
    placement.release_engines(dspy.Predict("question -> answer"))
    assert placement.kv_held == generator.stats.peak_kv_bytes  # remembered past the engines
    assert not placement.beside_training(trained(room + 400)) and placement.kv_cap_mb is None
    assert placement.beside_training(tmp_path / "not-trained-here")  # unknown: this process's peak alone
    forced = Placement(LEAPConfig(evaluate_beside_training=True), KeyBox(num_train=1), "run")
    assert forced.beside_training(trained(room + 400)) and forced.kv_cap_mb is None
    assert not Placement(LEAPConfig(evaluate_beside_training=False), KeyBox(), "run").beside_training(None)


HEAPS = """
import ctypes, sys, threading
from leap_dspy.train.common import cap_heaps
if sys.argv[1] == "capped":
    cap_heaps()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
all_alive = threading.Barrier(24)
def allocate():
    block = libc.malloc(1 << 16)  # a new thread's first allocation picks its heap
    all_alive.wait()
    libc.free(ctypes.c_void_p(block))
threads = [threading.Thread(target=allocate) for _ in range(24)]
for thread in threads: thread.start()
for thread in threads: thread.join()
out = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fclose(ctypes.c_void_p(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's heaps")
def test_the_cli_caps_glibcs_heaps_before_threads_start(tmp_path: Path) -> None:
    """24 threads allocating at once get a heap each (up to 8 per core) unless `cap_heaps` ran first; then 2."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    heaps = {}
    for mode in ("capped", "default"):
        info = tmp_path / f"{mode}.xml"
        subprocess.run([sys.executable, "-c", HEAPS, mode, str(info)], check=True, env=env, timeout=60)
        heaps[mode] = info.read_text().count("<heap nr=")
    assert heaps["capped"] <= 2 < heaps["default"]
