"""Where a compile's work runs: the student's LM (this process, or a pool of inference servers), each episode's
environment (here, or Ray actors) and each fine-tune (this process, or a launcher's processes), and which
adapter the student's engine holds meanwhile: a stage's evaluation (`Owed`) may run beside the next fine-tune.

`LEAP` asks a `Placement` and never branches on `rollout_servers`, `ray` or `train_launcher` itself; every
backend is imported only when its setting asks for it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from leap_dspy.config import LEAPConfig
from leap_dspy.cores import SharedCores, idle_bf16_cores
from leap_dspy.envs import env_spec
from leap_dspy.envs.base import TextEnv
from leap_dspy.lm import close_all, local_lm
from leap_dspy.lm.registry import loaded_generators
from leap_dspy.progress import console
from leap_dspy.store import atomic_write_text
from leap_dspy.train import TrainConfig, TrainResult
from leap_dspy.train.common import RESULT_FILE, machine_memory_mb, peak_rss_mb, release_memory, rss_mb
from leap_dspy.train.launch import launcher_program

if TYPE_CHECKING:
    from leap_dspy.shards import Shards

_IN_PROCESS_TRAINING = threading.Lock()
"""Fine-tunes inside this process (`train_launcher: ''`) from compiles on several threads run one after another:
two at once race in TRL's lazy module (ImportError: cannot import name 'SFTConfig') and set torch's threads."""


@dataclass
class Owed:
    """A stage's evaluation, run by whichever later stage can spare the time; `seconds` it took, once run.
    Empty where nothing is owed (the evaluation was done in an earlier run of the folder)."""

    work: Callable[[], float] | None = None
    seconds: float = 0.0

    def __call__(self) -> None:
        self.seconds = self.work() if self.work is not None else 0.0


class FineTuneFailed(RuntimeError):
    """A launched fine-tune ended without its adapter; what it printed is in the stage's train_launch.log."""


class Placement:
    def __init__(self, config: LEAPConfig, env: TextEnv, run_name: str) -> None:
        self.config, self.env, self.run_name = config, env, run_name
        self.pointed: Path | None = None  # the adapter the student acts with (None: base weights, or released)
        self.kv_cap_mb: int | None = None  # the KV cache an evaluation beside a fine-tune may hold (`beside_training`)
        self.kv_held = 0  # bytes: the largest KV cache one batch of this compile's engines held so far
        self._pool: Any = None
        self._ray_episodes: Any = None
        if config.train_launcher:  # a launcher that is not there fails now, not at the first fine-tune
            launcher_program(config.train_launcher)
        if config.ray and env_spec(env).startswith("__main__:"):  # Ray's workers import it by its module
            raise ValueError(f"ray: {type(env).__name__} is defined in the script being run, which Ray's workers "
                             "cannot import; move it to a module of its own")

    def point(self, student: Any, adapter: Path | None) -> None:
        """The student acts with `adapter` on the base weights, here or through the server pool."""
        student.set_lm(self.student_lm(adapter))
        self.pointed = adapter

    def release_engines(self, student: Any) -> None:
        """Before a fine-tune, or once the evaluation beside it ends: the student's engine holds weights no later
        stage acts with, and the trainer needs the memory."""
        student.set_lm(None)
        self.note_kv_held()
        close_all()
        release_memory()
        self.pointed = None

    def local_lm(self, adapter: Path | None) -> Any:
        """The student's weights (+ `adapter`) on the engine in this process."""
        lm = {**self.config.lm, **({"kv_budget_mb": self.kv_cap_mb} if self.kv_cap_mb else {})}
        return local_lm(self.config.model, **({"adapter": str(adapter)} if adapter else {}), **lm)

    def student_lm(self, adapter: Path | None) -> Any:
        """The LM the student acts with: local, or through the server pool (`rollout_servers`), into each server
        of which the adapter is loaded first, under a name of its own."""
        if not self.config.rollout_servers:
            return self.local_lm(adapter)
        from leap_dspy.lm.pool import ServerPool

        if self._pool is None:
            self._pool = ServerPool(self.config.rollout_servers, api_key=os.environ.get("LEAP_DSPY_API_KEY"))
            self._check_served_base(self._pool.base_model())
        if adapter is None:
            name = self._pool.base_model()
        else:
            name = f"{self.run_name}-{adapter.parent.name}"
            self._pool.load_adapter(name, str(adapter.resolve()))
        decoding = {k: self.config.lm[k] for k in ("no_repeat_ngram", "ngram_repeats") if k in self.config.lm}
        return self._pool.lm(name, max_tokens=self.config.lm["max_new_tokens"], decoding=decoding)

    def _check_served_base(self, served: str) -> None:
        """Servers name their base weights by the model's label (`leap-dspy serve`, and `vllm_command`'s
        vLLM): another name is most likely another model, whose rollouts the run would record as its student's."""
        from leap_dspy.lm.lms import model_label

        if served != model_label(self.config.model):
            console.print(f"[yellow]warning:[/yellow] the rollout servers serve {escape(served)!r}, and this run "
                          f"trains {escape(self.config.model)!r}: each round's adapter is loaded onto the servers' "
                          "base, so unless that is the same model under another name, rollouts and evaluations "
                          "act with other weights than the ones trained", soft_wrap=True, highlight=False)

    @property
    def episodes(self) -> Any:
        """What each episode's environment is cloned from: the environment, or a pool of Ray actors holding it
        (`ray`)."""
        if not self.config.ray:
            return self.env
        if self._ray_episodes is None:
            from leap_dspy.remote import RayEpisodes

            self._ray_episodes = RayEpisodes(self.env, self.config.ray, self.config.ray_workers)
        return self._ray_episodes

    def fine_tune(self, trainer: Any, rows: list[dict[str, Any]], out: Path, previous: Path | None,
                  config: TrainConfig, student: Any, beside: Owed) -> tuple[TrainResult, float]:
        """One fine-tune: as its own processes under `train_launcher`, or in this process when there is none.
        `beside` is the previous stage's evaluation, which the fine-tune does not wait for: it runs while a
        launched fine-tune trains when `beside_training`, else first; then the student's engine is released.
        Returns the result and the seconds the two ran side by side."""

        def evaluate_then_release() -> None:
            if self.kv_cap_mb:  # the same weights, on an engine whose batches fit the cap
                self.point(student, self.pointed)
            try:
                beside()
            finally:
                self.kv_cap_mb = None
            self.release_engines(student)

        launched = bool(self.config.train_launcher)
        together = beside.work is not None and launched and self.beside_training(previous)
        if not together:
            evaluate_then_release()
        if launched:
            method = trainer.__name__.removeprefix("train_")
            return self.launch_fine_tune(method, out, previous, config, evaluate_then_release if together else None)
        with _IN_PROCESS_TRAINING:  # one at a time: TRL's lazy imports and torch's thread count are process-wide
            return trainer(rows, model=self.config.model, output_dir=out,
                           init_adapter=str(previous) if previous else None, config=config), 0.0

    def episode_shards(self, student: Any, play: dict[str, Any], replay: dict[str, Any] | None,
                       folder: Path) -> Shards | None:
        """How a stage's student episodes split across processes (`episode_processes`, unset: `Shards.of`'s),
        or None where they play here alone: the episodes step in Ray actors, a fine-tune holds part of the cores,
        or a worker could not rebuild the student or the environment (`Shards.of`)."""
        from leap_dspy.cores import cores_split
        from leap_dspy.shards import Shards

        if self.config.ray or cores_split():
            return None
        return Shards.of(student, self.env, self.config.episode_processes, play, folder, replay)

    def beside_training(self, previous: Path | None) -> bool:
        """Whether an evaluation runs beside the fine-tune that continues `previous`: `evaluate_beside_training`,
        or by default on a CPU of two cores or more that computes in bf16 where both fit the memory budget. With
        bf16 units the matmuls are fast and each side leaves its cores partly idle; on a float32 CPU both are
        busy computing, and on a GPU both would need its memory. Sets `kv_cap_mb` where they fit only so."""
        self.kv_cap_mb = None
        chosen = self.config.evaluate_beside_training
        if chosen is False or chosen is None and not idle_bf16_cores():
            return False
        excess = self._predicted_mb(previous) - self.config.memory_budget_mb(machine_memory_mb())
        if excess <= 0:
            return True
        self.kv_cap_mb = self._kv_cap_mb(excess)
        if self.kv_cap_mb is None and not chosen:
            console.print(f"evaluating first: beside the fine-tune, {excess:.0f} MiB over the memory budget")
            return False
        if self.kv_cap_mb is not None:
            console.print(f"evaluating beside the fine-tune, its KV cache capped at {self.kv_cap_mb} MiB (the "
                          "memory budget)")
        return True

    def _predicted_mb(self, previous: Path | None) -> float:
        """Both sides' memory: the fine-tune that made `previous` (the next is of the same model and rows alike)
        and this process's peak so far."""
        trained = 0.0
        with contextlib.suppress(OSError, ValueError):
            if previous is not None:
                trained = TrainResult.model_validate_json((previous / RESULT_FILE).read_text()).peak_rss_mb
        return trained + peak_rss_mb()

    def note_kv_held(self) -> None:
        """Keep the largest KV cache the loaded engines held, before they go."""
        self.kv_held = max([self.kv_held, *(g.stats.peak_kv_bytes for g in loaded_generators())])

    def _kv_cap_mb(self, excess: float) -> int | None:
        """The KV cache that takes `excess` MiB off the largest this compile's engines held (the batches of the
        evaluation that set its peak, as a rule), or None where that is less than the weights (a decode step
        would read more weights than cache, and the evaluation's speed is what running beside buys) or the
        engine runs elsewhere (`rollout_servers`)."""
        generators = loaded_generators()
        if self.config.rollout_servers or not generators:
            return None
        self.note_kv_held()
        cap = self.kv_held / 2**20 - excess
        return int(cap) if cap >= max(g.weight_bytes for g in generators) / 2**20 else None

    def launch_fine_tune(self, method: str, out: Path, previous: Path | None, config: TrainConfig,
                         beside: Callable[[], None] | None = None) -> tuple[TrainResult, float]:
        """The fine-tune as its own processes under `train_launcher` (torchrun, accelerate launch): the rows
        (already in the stage's `train_rows.jsonl`) and settings go through files, the result comes back inside
        the published adapter. With `beside`, that runs here meanwhile, the cores split (`SharedCores`)."""
        from leap_dspy.runs import held
        from leap_dspy.train.launch import LAUNCHED_BY, launch_command

        stage = out.parent
        atomic_write_text(stage / "train_config.json", config.model_dump_json(indent=2))
        command = launch_command(self.config.train_launcher, method, stage / "train_rows.jsonl", self.config.model,
                                 out, previous, stage / "train_config.json")
        atomic_write_text(stage / "launch.sh", shlex.join(command) + "\n")  # what other nodes run, for many nodes
        host, shared_s = rss_mb(), 0.0
        cores = SharedCores(stage, split=not self.config.rollout_servers) if beside else None
        lock = held(stage.parent)  # the trainer holds the run folder too, until it ends (`runs.hold`)
        environ = {**(cores.environ() if cores else os.environ), LAUNCHED_BY: str(os.getpid())}
        with open(stage / "train_launch.log", "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ,
                                       pass_fds=() if lock is None else (lock,))
            try:
                if cores is not None and beside is not None:
                    shared_s = cores.run(beside, process)
                    host = max(host, peak_rss_mb())  # at most what this process held beside the trainer
            except Exception:  # the evaluation failed: the fine-tune still finishes and publishes its adapter
                process.wait()
                raise
            except BaseException:  # interrupted: the trainer stops too
                process.terminate()
                process.wait()
                raise
            code = process.wait()
        if code != 0 or not (out / RESULT_FILE).exists():
            tail = (stage / "train_launch.log").read_text(errors="replace")[-1500:].strip()
            how = (f"was killed by signal {-code}" if code < 0 else f"exited {code}" if code else
                   "exited 0 without publishing an adapter")
            raise FineTuneFailed(f"the launched fine-tune {how} ({stage / 'train_launch.log'}"
                                 + (f"; its last lines:\n{tail})" if tail else ", empty)")
                                 + "; run the same command again to resume")
        result = TrainResult.model_validate_json((out / RESULT_FILE).read_text())
        result = result.model_copy(update={"host_rss_mb": round(host, 1)})
        atomic_write_text(out / RESULT_FILE, result.model_dump_json(indent=2))  # what a resumed run reads back
        return result, shared_s
