"""A compile's evaluation of each stage: the validation tasks played strictly (an action runs as written), the
episodes with a near miss replayed snapped beside them, and the stage's `metrics.json`.

`LEAP.compile` owes each stage's evaluation to the next stage (`owed`), which runs it beside its fine-tune where
`Placement` says the cores allow; the reference rows (`base`, `expert`) are played once, before behaviour cloning.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dspy

from leap_dspy.config import LEAPConfig
from leap_dspy.metrics import split_metrics
from leap_dspy.placement import Owed, Placement
from leap_dspy.programs.student import Student, has_near_miss
from leap_dspy.progress import console
from leap_dspy.rollout import Episodes, Replays, engine_counters, expert_policy, play_episodes, student_policy
from leap_dspy.runs import RunFolder, check_adapter
from leap_dspy.store import JsonlLog, atomic_write_json
from leap_dspy.trackers import Trackers
from leap_dspy.train.common import peak_rss_mb
from leap_dspy.types import Task, Trajectory


class StageEvaluations:
    """Evaluates `student` (or the expert, for its reference row) after each stage of one run folder."""

    def __init__(self, run: RunFolder, config: LEAPConfig, placement: Placement, trackers: Trackers,
                 student: Student, *, with_scores: bool) -> None:
        self.run, self.config, self.placement, self.trackers = run, config, placement, trackers
        self.student, self.with_scores = student, with_scores

    def owed(self, k: int, val: list[Task], work_s: float, extra: dict[str, Any]) -> Owed:
        """Stage k's evaluation, with its adapter, to run when the next stage can spare the time."""
        adapter = self.run.stage(k) / "adapter"

        def evaluate() -> float:
            if self.placement.pointed != adapter:  # it is, unless a resume or a kept round released it
                self.placement.point(self.student, check_adapter(adapter))
            return self.play(k, self.student, val, work_s=work_s, extra=extra)

        return Owed(evaluate)

    def play(self, name: str | int, policy: dspy.Module, tasks: list[Task], extra: dict[str, Any],
             work_s: float = 0.0, expert_level: int | None = None) -> float:
        """Play the validation tasks (the student, strictly: an action runs as written; or with `expert_level`
        the expert itself) and write the stage's metrics; `wall_s` is the stage's `work_s` (its own seconds
        before evaluating) and the evaluation's. Returns the evaluation's seconds (0 if it was done before)."""
        stage = self.run.stage(name)
        if (stage / "metrics.json").exists():
            return 0.0
        start = time.perf_counter()
        snapped = self.replays(name) if expert_level is None and self.config.evaluate_snapped else None
        play, threads, shards = self._policy(name, policy, stage, expert_level, snapped is not None)
        log = JsonlLog(stage / "eval.jsonl", Trajectory, key=lambda t: t.task.id)
        before = engine_counters(policy)
        done = play_episodes(Episodes(log, tasks, f"evaluate {name}", play, replays=snapped), self.placement.episodes,
                             program=policy, num_threads=threads, progress=self.config.progress, shards=shards)
        work = {f"eval_{k}": round(v - before[k], 1) for k, v in engine_counters(policy).items()}
        metrics: dict[str, Any] = {"iteration": str(name), **split_metrics(list(done.values())),
                                   "train_examples": 0, **work, **extra}
        if snapped is not None:
            metrics.update(self.snapped(name, tasks, done, snapped))
        metrics["eval_s"] = round(time.perf_counter() - start, 1)
        metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)  # this process's, so far; a launched fine-tune's is apart
        metrics["wall_s"] = round(work_s + metrics["eval_s"], 1)
        atomic_write_json(stage / "metrics.json", metrics)
        self.trackers.log_stage(str(name), metrics)
        self.run.write_metrics_csv(with_scores=self.with_scores)
        shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("seen_success", "unseen_success") if k in metrics)
        console.print(f"[bold]{name}[/bold]: {shown}")
        return metrics["eval_s"]

    def _policy(self, name: str | int, policy: dspy.Module, stage: Path, expert_level: int | None,
                snapped: bool) -> tuple[Any, int, Any]:
        """Who plays the evaluation, on how many threads, and the worker processes it may split across."""
        if expert_level is not None:
            return (expert_policy(policy, self.student, self.placement.env, level=expert_level,
                                  retries=self.config.expert_retries), self.config.expert_threads, None)
        # Only evaluations split: their episodes decide no training row, so batches of other sizes, which flip
        # bf16 near-ties, cannot change what a run learns (split rollouts did, docs/results.md).
        shards = self.placement.episode_shards(self.student, {"policy": str(name), "snap": False},
                                               {"policy": str(name), "snap": True} if snapped else None, stage)
        return student_policy(self.student, policy=str(name), snap=False), self.config.num_threads, shards

    def replays(self, name: str | int) -> Replays:
        """The student replaying, with near misses snapped, the strict evaluation's episodes that had one."""
        return Replays(JsonlLog(self.run.stage(name) / "eval_snapped.jsonl", Trajectory, key=lambda t: t.task.id),
                       play=student_policy(self.student, policy=str(name), snap=True))

    def snapped(self, name: str | int, tasks: list[Task], strict: dict[str, Trajectory],
                replays: Replays) -> dict[str, Any]:
        """Success had near misses been snapped to the admissible action (`Student.snap_actions`), reported
        beside the strict one. Greedy decoding replays an episode step for step up to its first near miss,
        so only the episodes that had one play again: as each ends (see `Replays`), and here those a stop cut
        short."""
        near = [task for task in tasks if has_near_miss(strict[task.id])]
        replayed = play_episodes(Episodes(replays.log, near, f"evaluate {name}, snapped", replays.play),
                                 self.placement.episodes, program=self.student, num_threads=self.config.num_threads,
                                 progress=self.config.progress) if near else {}
        metrics = split_metrics([replayed.get(task.id, strict[task.id]) for task in tasks])
        snapped = {f"{k}_snapped": v for k, v in metrics.items() if k.endswith(("_success", "_score"))}
        return {**snapped, "near_miss_episodes": len(near)}
