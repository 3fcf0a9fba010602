"""The LEAP teleprompter: behaviour cloning, then rounds of rollouts, privileged corrections, aggregation
and fine-tuning, compiled into LoRA weights for the student's local LM.

It follows DSPy's optimizer shape (`compile(student, trainset=..., teacher=..., valset=...)` returns the
student, pointed at new weights), and differs from `BootstrapFinetune` on one point on purpose: training rows
are formatted with the *student's* signature and inputs, never with the teacher's trace, because the
teacher's inputs hold the privileged state.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy.teleprompt import Teleprompter

from leap_dspy.envs.base import TextEnv, action_admissible
from leap_dspy.lm import DEFAULT_MODEL, local_lm
from leap_dspy.programs.agent import Agent
from leap_dspy.programs.experts import OracleExpert, expert_inputs
from leap_dspy.programs.student import Student
from leap_dspy.progress import console, progress_bar
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.rollout import (
    attach_env,
    expert_capture,
    expert_rollout,
    mean_reward,
    needs_oracle,
    run_parallel,
    success_rate,
)
from leap_dspy.runs import RunFolder, default_run_dir
from leap_dspy.signatures import PrivilegedCorrection, StudentTurn
from leap_dspy.store import JsonlLog, atomic_write_json, atomic_write_text, atomic_write_yaml
from leap_dspy.training_data import preference_rows, privileged_self_rows, sft_rows
from leap_dspy.types import Correction, ExpertUsage, Task, Trajectory

Update = Literal["sft", "dpo", "kto"]


class ConfigMismatch(ValueError):
    """The run folder was started with another configuration: resuming would mix two experiments."""


def as_tasks(examples: Iterable[Any]) -> list[Task]:
    """Accept `Task`s or `dspy.Example(task=Task)`s, the way DSPy optimizers take examples."""
    tasks = []
    for example in examples:
        task = example.task if isinstance(example, dspy.Example) else example
        if not isinstance(task, Task):
            raise TypeError(f"trainset/valset items must be Task or dspy.Example(task=Task), got {type(task)}")
        tasks.append(task)
    return tasks


BC_KEYS = ("env", "model", "trainset", "valset", "demonstrator", "bc_epochs", "bc_successful_only",
           "balance_actions", "max_train_rows", "train", "lm", "seed", "bc_expert_level")
"""The configuration that behaviour cloning depends on: runs that agree on it may share one (`bc_from`), whatever
their expert, update or privilege level."""

ITERATION_LR_SCALE = 0.1
"""An SFT round after behaviour cloning continues an adapter that already fits the format (loss 0.01-0.1): at
behaviour cloning's rate its updates broke the student's copying ("drawerbasin", "wateringcanned") and every
ALFWorld run fell to 0 after iteration 1, so the rounds fine-tune at a tenth of it."""


@dataclasses.dataclass
class Episodes:
    """Episodes for the current student to play: the tasks, what each step records, the log each lands in."""

    log: JsonlLog[Trajectory]
    tasks: list[Task]
    label: str
    policy: str
    capture_level: int | None = None
    capture_oracle: bool = False


class LEAP(Teleprompter):
    """Learning from privileged AI feedback (arXiv 2410.05434) as a DSPy teleprompter.

    Args:
        env: the environment the student acts in (its tasks come from `trainset`/`valset`).
        iterations: LEAP rounds after behaviour cloning.
        update: how corrections become weights: `sft`, or preference optimisation `dpo`/`kto` (the
            correction preferred over the student's own step).
        model: the student's base weights (the embedded SmolLM2 by default, or any local HF model folder).
        privilege_level: how much privileged state the expert sees (the environment documents its levels);
            None uses the environment's default.
        run_dir: where everything is written; an existing folder with the same configuration is resumed.
        max_train_rows: rows per fine-tuning round after behaviour cloning: every new correction, then older
            ones (DAgger's aggregate) sampled to fill up. Bounds a round's cost as the aggregate grows;
            behaviour cloning takes up to twice as many demonstration steps.
        rollout_tasks: training tasks the student plays per iteration (a fresh seeded sample each round, all
            when None): rollouts of a weak student run to the step limit, so they bound a round's cost too.
        balance_actions: SFT rows of rarer kinds of action are repeated up to this many times, within the same
            row budget (see `balance_by_action`); 1 trains on the raw mix.
        drop_unrealizable: keep corrections whose reason names things the student never saw out of training
            (they are always flagged in `corrections.jsonl` and counted in the metrics).
        demonstrator: who plays the behaviour-cloning demonstrations; default the teacher, or the scripted
            oracle when the teacher is the student's own privileged self (untrained, it has nothing to show).
            With the privileged self as teacher, behaviour cloning also trains the weights in the expert's part
            on the same demonstrations (`privileged_self_rows`): those rows are expert prompts, with the
            privileged state, and never student prompts.
        teacher: the expert when `compile` is given none (how `dspy.BetterTogether`, which only passes teachers
            shaped like the student, gets a privileged expert to LEAP); default the scripted oracle.
        lm_kwargs: settings of the student's local engine (`LocalEngine`); `max_new_tokens` defaults to 80,
            room for a one-sentence reason and an action in DSPy's chat format, and `no_repeat_ngram` to 12
            (a greedy 135M student otherwise loops within a reason: "the first unvisited is the first ...";
            no training answer of any environment repeats a 12-gram, while at 5 the action's "sinkbasin 1"
            repeated the reason's and was cut short).
        iteration_lr: the learning rate of the rounds after behaviour cloning; None = a tenth of behaviour
            cloning's for SFT (`ITERATION_LR_SCALE`), the method's own for DPO/KTO (`TrainConfig.lr_for`).
        preference_anchor: the share of a DPO/KTO round's rows that are anchors: steps that were right (the
            expert left them unchanged, or earlier rounds' data, demonstrations included) trained as
            desirable (KTO) or by DPO's NLL term (DPO). Pairs alone only say what to avoid where the student
            erred: on ALFWorld most pairs were "move X to Y" rejected for "go to Y" (the student put things
            down before arriving), and one anchorless round taught the student never to write "move" again
            (0 of its actions, from 73), which took it from 0.15 to 0 on unseen. 0 trains on pairs alone.
        bc_from: a finished run folder whose behaviour cloning this run starts from (its `iter_0`, and its
            `base` row; its `expert` row too when the expert and privilege level are the same). Comparisons
            of updates, experts and privilege levels then differ only in what they compare, as in the paper,
            and each skips the costliest stage. The runs must agree on everything behaviour cloning depends
            on (`BC_KEYS`).
    """

    def __init__(
        self,
        env: TextEnv,
        *,
        iterations: int = 2,
        update: Update = "sft",
        model: str = DEFAULT_MODEL,
        privilege_level: int | None = None,
        run_dir: str | Path | None = None,
        train_config: Any = None,
        bc_epochs: float = 1.0,
        epochs: float = 1.0,
        iteration_lr: float | None = None,
        preference_anchor: float = 0.5,
        max_train_rows: int = 120,
        rollout_tasks: int | None = 12,
        bc_successful_only: bool = True,
        balance_actions: int = 2,
        drop_unrealizable: bool = False,
        demonstrator: dspy.Module | None = None,
        num_threads: int = 64,
        expert_threads: int = 8,
        expert_retries: int = 3,
        evaluate_base: bool = True,
        evaluate_expert: bool = True,
        lm_kwargs: dict[str, Any] | None = None,
        teacher: dspy.Module | None = None,
        seed: int = 0,
        progress: bool = True,
        bc_from: str | Path | None = None,
    ) -> None:
        super().__init__()
        if update not in ("sft", "dpo", "kto"):
            raise ValueError(f"update must be sft, dpo or kto, not {update!r}")
        if iterations < 0:
            raise ValueError("iterations must be >= 0")
        self.env = env
        self.iterations = iterations
        self.update = update
        self.model = model
        self.privilege_level = env.check_level(
            env.default_privilege_level if privilege_level is None else privilege_level
        )
        self.run = RunFolder(run_dir or default_run_dir(env.name))
        self.train_config = train_config
        self.bc_epochs = bc_epochs
        self.epochs = epochs
        if not 0 <= preference_anchor < 1:
            raise ValueError("preference_anchor must be in [0, 1)")
        self.iteration_lr = iteration_lr
        self.preference_anchor = preference_anchor
        self.max_train_rows = max_train_rows
        self.rollout_tasks = rollout_tasks
        self.bc_successful_only = bc_successful_only
        self.balance_actions = balance_actions
        self.drop_unrealizable = drop_unrealizable
        self.demonstrator = demonstrator
        self.num_threads = num_threads
        self.expert_threads = expert_threads
        self.expert_retries = expert_retries
        self.evaluate_base = evaluate_base
        self.evaluate_expert = evaluate_expert
        self.lm_kwargs = {"max_new_tokens": 80, "no_repeat_ngram": 12, **(lm_kwargs or {})}
        self.teacher = teacher
        self.seed = seed
        self.progress = progress
        self.bc_from = None if bc_from is None else Path(bc_from)

    # -- configuration -------------------------------------------------------------------------------------

    def config(self, teacher: dspy.Module, trainset: list[Task], valset: list[Task]) -> dict[str, Any]:
        from leap_dspy.train import TrainConfig

        train_config = self.train_config or TrainConfig()
        return {
            "env": {"name": self.env.name, **self.env.config()},
            "model": self.model,
            "iterations": self.iterations,
            "update": self.update,
            "privilege_level": self.privilege_level,
            "expert": describe_expert(teacher),
            "demonstrator": describe_expert(self._demonstrator(teacher)),
            **({"bc_expert_level": self.privilege_level} if _follows_student(teacher) else {}),
            "trainset": [t.id for t in trainset],
            "valset": [t.id for t in valset],
            "bc_epochs": self.bc_epochs,
            "epochs": self.epochs,
            "iteration_lr": self._iteration_lr(),
            **({"preference_anchor": self.preference_anchor} if self.update != "sft" else {}),
            "max_train_rows": self.max_train_rows,
            "rollout_tasks": self.rollout_tasks,
            "bc_successful_only": self.bc_successful_only,
            "balance_actions": self.balance_actions,
            "train": train_config.model_dump(),
            "lm": self.lm_kwargs,
            "seed": self.seed,
            "bc_from": None if self.bc_from is None else str(self.bc_from.resolve()),
        }

    def _start(self, config: dict[str, Any]) -> None:
        import yaml

        path = self.run.config_path
        if path.exists():
            existing = yaml.safe_load(path.read_text())
            ignored = {"iterations"}  # a finished run may be extended with more iterations
            diff = sorted(k for k in set(existing) | set(config)
                          if k not in ignored and existing.get(k) != config.get(k))
            if diff:
                raise ConfigMismatch(
                    f"{self.run.path} holds a run with a different configuration ({', '.join(diff)}); "
                    "use another run folder"
                )
            console.print(f"resuming the run in {self.run.path}")
        self.run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(path, config)

    def check_teacher(self, teacher: dspy.Module) -> None:
        """Refuse a teacher that cannot correct at this run's privilege level, before anything runs."""
        top = max(self.env.privilege_levels)
        levels = getattr(getattr(teacher, "expertise", None), "levels", ())
        if getattr(teacher, "scripted", False) and self.privilege_level < top and self.privilege_level not in levels:
            raise ValueError(f"the scripted expert has no policy at privilege level {self.privilege_level} on "
                             f"{self.env.name} (it follows the oracle at level {top}); use an LM expert there")

    def _adopt_behaviour_cloning(self, config: dict[str, Any]) -> None:
        """Copy `bc_from`'s behaviour cloning (and its reference rows) into this run, once."""
        import yaml

        source = RunFolder(self.bc_from)
        bc = source.path / "iter_0"
        if not source.config_path.exists() or not (bc / "metrics.json").exists() or not (
                bc / "adapter" / "adapter_config.json").exists():
            raise ConfigMismatch(f"bc_from: {source.path} holds no finished behaviour cloning (iter_0)")
        theirs = yaml.safe_load(source.config_path.read_text())
        keys = BC_KEYS + (("privilege_level",) if "model" in config["demonstrator"] else ())  # an LM reads it
        diff = sorted(k for k in keys if theirs.get(k) != config.get(k))
        if diff:
            raise ConfigMismatch(f"bc_from: {source.path} cloned behaviour under another configuration "
                                 f"({', '.join(diff)})")
        same_expert = all(theirs.get(k) == config[k] for k in ("expert", "privilege_level"))
        stages = ["iter_0", "base"] + (["expert"] if same_expert else [])  # the expert row plays at its level
        for name in stages:
            target = self.run.path / name
            if (source.path / name / "metrics.json").exists() and not (target / "metrics.json").exists():
                tmp = target.with_name(name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(source.path / name, tmp)
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
        console.print(f"behaviour cloning from {source.path}")

    # -- the loop ------------------------------------------------------------------------------------------

    def compile(self, student: Student | Agent, *, trainset: Sequence[Any],
                teacher: dspy.Module | list[dspy.Module] | None = None, valset: Sequence[Any] | None = None,
                **kwargs: Any) -> Student | Agent:
        """Train `student` (a `Student`, or an `Agent` holding one) with LEAP; returns it pointing at the final
        adapter."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if isinstance(teacher, list):
            teacher = teacher[0] if teacher else None
        teacher = teacher or self.teacher or OracleExpert()
        if isinstance(student, Agent):
            self._compile_student(student.student, train_tasks=as_tasks(trainset), val_tasks=as_tasks(valset or []),
                                  teacher=teacher)
            return student
        return self._compile_student(student, train_tasks=as_tasks(trainset), val_tasks=as_tasks(valset or []),
                                     teacher=teacher)

    def _compile_student(self, student: Student, *, train_tasks: list[Task], val_tasks: list[Task],
                         teacher: dspy.Module) -> Student:
        if not train_tasks:
            raise ValueError("trainset is empty")
        teacher = attach_env(teacher, self.env)
        self.check_teacher(teacher)
        config = self.config(teacher, train_tasks, val_tasks)
        self._start(config)
        if self.bc_from is not None:
            self._adopt_behaviour_cloning(config)
        compile_start = time.perf_counter()
        random.seed(self.seed)

        student.set_lm(local_lm(self.model, **self.lm_kwargs))
        self._student = student
        if self.evaluate_base and val_tasks:
            self._evaluate_stage("base", student, val_tasks, stage_s=0.0, extra={})
        if self.evaluate_expert and val_tasks:
            self._expert_reference(teacher, student, val_tasks)
        adapter = None
        for k in range(self.iterations + 1):
            adapter = self._iteration(k, student, teacher, train_tasks, val_tasks, adapter)
        self.run.write_metrics_csv(with_scores=self._with_scores)
        self.run.write_report(f"LEAP on {self.env.name}", with_scores=self._with_scores)
        student.set_lm(local_lm(self.model, adapter=str(adapter), **self.lm_kwargs))
        student.save(str(self.run.path / "student.json"))
        console.print(f"compiled in {time.perf_counter() - compile_start:.0f} s; run folder: {self.run.path}")
        return student

    @property
    def _with_scores(self) -> bool:
        return bool(getattr(self.env, "reports_score", False))

    def _iteration(self, k: int, student: Student, teacher: dspy.Module, train_tasks: list[Task],
                   val_tasks: list[Task], previous_adapter: Path | None) -> Path:
        stage = self.run.stage(k)
        adapter_dir = stage / "adapter"
        metrics_path = stage / "metrics.json"
        if metrics_path.exists() and (adapter_dir / "adapter_config.json").exists():
            student.set_lm(local_lm(self.model, adapter=str(adapter_dir), **self.lm_kwargs))
            return adapter_dir
        start = time.perf_counter()
        corrections = JsonlLog(stage / "corrections.jsonl", Correction, key=lambda c: c.key)

        if k == 0:
            demonstrator = self._demonstrator(teacher)
            demonstrations = JsonlLog(stage / "trajectories.jsonl", Trajectory, key=lambda t: t.task.id)
            record_level = self.privilege_level if _follows_student(teacher) else None
            done = self._collect(demonstrations, train_tasks, lambda todo, save: expert_rollout(
                demonstrator, student, self.env, todo, level=self._demonstration_level(demonstrator),
                num_threads=self.expert_threads, policy="expert", record_level=record_level,
                on_trajectory=save), "demonstrations")
            self._demonstrations(done, corrections, self._demonstration_level(demonstrator))
        else:
            if _follows_student(teacher):
                teacher.follow(student)
            (done,) = self._play(student, [self._rollouts(k, teacher, train_tasks)])
            self._correct(k, teacher, done, corrections)

        current = [c for c in corrections.load().values() if c.iteration == k]
        rows, train_examples = self._training_rows(k, current)
        if k == 0 and _follows_student(teacher):
            # The privileged self is these same weights: behaviour cloning also teaches them the expert's part.
            expert_rows = privileged_self_rows(PrivilegedCorrection, teacher.adapter, done.values(),
                                               self.max_train_rows, random.Random(self.seed * 17),
                                               self._propose_reason, self.env.idle_actions)
            rows, train_examples = rows + expert_rows, train_examples + len(expert_rows)
        atomic_write_text(stage / "train_rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        train_start = time.perf_counter()
        if not (adapter_dir / "adapter_config.json").exists():
            self._train(rows, adapter_dir, previous_adapter, epochs=self.bc_epochs if k == 0 else self.epochs,
                        learning_rate=None if k == 0 else self._iteration_lr())
        train_s = time.perf_counter() - train_start
        student.set_lm(local_lm(self.model, adapter=str(adapter_dir), **self.lm_kwargs))
        extra = {
            "train_examples": train_examples,
            "corrections": len(current),
            "corrections_changed": sum(c.changed for c in current if c.dropped is None),
            "corrections_dropped": sum(c.dropped is not None for c in current),
            "corrections_unrealizable": sum(bool(c.unobserved) for c in current),
            "train_success": success_rate(list(done.values())),
            **expert_usage_metrics(current),
            "train_s": round(train_s, 1),
        }
        # The next round's rollouts need these weights too: they are played alongside the evaluation.
        alongside = self._rollouts(k + 1, teacher, train_tasks) if k < self.iterations else None
        self._evaluate_stage(k, student, val_tasks, stage_s=time.perf_counter() - start, extra=extra,
                             alongside=alongside)
        return adapter_dir

    def _rollouts(self, k: int, teacher: dspy.Module, train_tasks: list[Task]) -> Episodes:
        """Round k's rollouts: the student of round k - 1 on a seeded sample of the training tasks."""
        tasks = train_tasks
        if self.rollout_tasks is not None and self.rollout_tasks < len(train_tasks):
            tasks = random.Random(self.seed * 7919 + k).sample(train_tasks, self.rollout_tasks)
        capture_level, capture_oracle = expert_capture(teacher, self.env, self.privilege_level)
        log = JsonlLog(self.run.stage(k) / "trajectories.jsonl", Trajectory, key=lambda t: t.task.id)
        return Episodes(log, tasks, f"iteration {k}: rollouts", f"student@{k - 1}", capture_level, capture_oracle)

    def _play(self, student: Student, jobs: list[Episodes]) -> list[dict[str, Trajectory]]:
        """Play the episodes not yet in each job's log, all jobs at once, each appended as it ends (the resume
        point); returns every job's episodes by task id.

        One round's evaluation and the next round's rollouts are played by the same weights, so they share
        the engine's batches, and the nearly empty batches near the end (a few long episodes left) are paid
        for once. On the 2-core CPU this saved little (ALFWorld, 30 + 20 episodes: 373 s together against
        211 + 171 s apart), because generation there is compute-bound and costs the same per row at any batch
        size. On a GPU a decode step costs about the same at batch 30 and 50, which is where it is meant to pay.
        """
        done = [job.log.load() for job in jobs]
        todo = [(job, have, task) for job, have in zip(jobs, done, strict=True) for task in job.tasks
                if task.id not in have]
        if not todo:
            return done
        keys = [task.model_copy() for _, _, task in todo]  # one object per episode, even if two jobs share a task
        owner = {id(key): item for key, item in zip(keys, todo, strict=True)}

        def play(env: TextEnv, key: Task) -> Trajectory:
            job, have, task = owner[id(key)]
            trajectory = student.run(env, task, capture_level=job.capture_level, capture_oracle=job.capture_oracle,
                                     policy=job.policy)
            job.log.append(trajectory)
            have[task.id] = trajectory
            return trajectory

        label = " + ".join(dict.fromkeys(job.label for job, _, _ in todo))
        with progress_bar(label, len(todo), self.progress) as advance:
            run_parallel(play, self.env, keys, num_threads=self.num_threads, program=student,
                         on_trajectory=lambda _: advance())
        return done

    def _demonstration_level(self, demonstrator: dspy.Module) -> int:
        """The scripted oracle demonstrates with everything it knows, whatever level corrections are made at:
        runs along the privilege dial then share one behaviour cloning, as in the paper's comparison."""
        return max(self.env.privilege_levels) if getattr(demonstrator, "scripted", False) else self.privilege_level

    def _demonstrator(self, teacher: dspy.Module) -> dspy.Module:
        if self.demonstrator is not None:
            return self.demonstrator
        return attach_env(OracleExpert(), self.env) if _follows_student(teacher) else teacher

    def _propose_reason(self, task: str, observation: str, action: str, history: str) -> str:
        from leap_dspy.types import PrivilegedState, StudentInputs

        inputs = StudentInputs(task=task, observation=observation, history=history)
        return self.env.expertise().explain(inputs, PrivilegedState(level=0), action)

    def _collect(self, log: JsonlLog[Trajectory], tasks: list[Task], play: Any, label: str) -> dict[str, Trajectory]:
        """Run the episodes not yet in `log`, appending each as it finishes (the resume point)."""
        done = log.load()
        todo = [t for t in tasks if t.id not in done]
        if todo:
            with progress_bar(label, len(todo), self.progress) as advance:
                def save(trajectory: Trajectory) -> None:
                    log.append(trajectory)
                    advance()

                for trajectory in play(todo, save):
                    done[trajectory.task.id] = trajectory
        return done

    # -- corrections ---------------------------------------------------------------------------------------

    def _demonstrations(self, demos: dict[str, Trajectory], log: JsonlLog[Correction], level: int) -> None:
        have = log.load()
        for trajectory in demos.values():
            if self.bc_successful_only and not trajectory.success:
                continue
            for step in trajectory.steps:
                record = Correction(task_id=trajectory.task.id, step=step.index, inputs=step.inputs,
                                    reason=step.reason, action=step.action, student_reason=step.reason,
                                    student_action=step.action, expert=trajectory.policy, iteration=0,
                                    level=level, source="demonstration",
                                    dropped=step.error)
                if record.key not in have:
                    log.append(record)

    def _correct(self, k: int, teacher: dspy.Module, trajectories: dict[str, Trajectory],
                 log: JsonlLog[Correction]) -> None:
        """Ask the expert about every visited step not yet corrected; failures are recorded, not raised.

        One call per step, or one per trajectory for an expert with `per == "trajectory"`; either way one
        record per step, saved as soon as its call returns.
        """
        have = log.load()
        pending = {t.task.id: [s for s in t.steps if f"{k}:{t.task.id}:{s.index}" not in have]
                   for t in trajectories.values()}
        per_trajectory = getattr(teacher, "per", "step") == "trajectory"
        jobs = [(trajectories[tid], steps) for tid, steps in pending.items() if steps]
        if not per_trajectory:
            jobs = [(trajectory, [step]) for trajectory, steps in jobs for step in steps]
        if not jobs:
            return
        name = describe_expert(teacher)["name"]
        uses_lm = not needs_oracle(teacher)

        def record(trajectory: Trajectory, step: Any, **fields: Any) -> Correction:
            base = dict(task_id=trajectory.task.id, step=step.index, inputs=step.inputs,
                        student_reason=step.reason, student_action=step.action, expert=name,
                        level=self.privilege_level, iteration=k)
            return Correction(**base, **{"reason": "", "action": "", **fields})

        def judged(trajectory: Trajectory, step: Any, reason: str, action: str, usage: ExpertUsage | None
                   ) -> Correction:
            action = (action.strip().splitlines() or [""])[0].strip()
            reason = reason.strip()
            dropped = None
            unobserved = unobserved_mentions(reason, step.inputs)
            if not action:
                dropped = "expert gave no action"
            elif not action_admissible(action, step.admissible_actions):
                dropped = f"expert action not admissible: {action[:80]}"
            elif unobserved and self.drop_unrealizable:
                dropped = f"reason not realizable: mentions {', '.join(unobserved[:3])}"
            return record(trajectory, step, reason=reason, action=action, dropped=dropped, unobserved=unobserved,
                          usage=usage)

        def ask(call: Any) -> tuple[Any, ExpertUsage | None, str | None]:
            """`call()` with retries and backoff: (answer, what the attempts cost, the last error)."""
            usage = ExpertUsage() if uses_lm else None
            error = "expert gave no answer"
            for attempt in range(self.expert_retries):
                with dspy.track_usage() as tracker:
                    try:
                        answer = call()
                    except Exception as exc:  # any expert failure: retry, then record it
                        error = f"expert failed: {type(exc).__name__}: {str(exc)[:200]}"
                        answer = None
                if usage is not None:
                    usage += call_usage(tracker)
                if answer is not None:
                    return answer, usage, None
                time.sleep(min(2.0**attempt * 0.5, 8.0) if attempt + 1 < self.expert_retries else 0)
            return None, usage, error

        def correct(job: tuple[Trajectory, list[Any]]) -> list[Correction]:
            trajectory, steps = job
            if steps[0].privileged is None:
                return [record(trajectory, s, dropped="no privileged state was captured") for s in steps]
            if not per_trajectory:
                step = steps[0]
                out, usage, error = ask(lambda: teacher(**expert_inputs(step.inputs, step.reason, step.action,
                                                                      step.privileged)))
                if out is None:
                    return [record(trajectory, step, dropped=error, usage=usage)]
                return [judged(trajectory, step, str(out.reason), str(out.action), usage)]
            turns = [StudentTurn(step=s.index, observation=s.inputs.observation, student_reason=s.reason,
                                 student_action=s.action) for s in steps]
            fixes, usage, error = ask(lambda: teacher.correct_trajectory(trajectory.task.instruction, turns,
                                                                          steps[0].privileged))
            if fixes is None:  # the call's cost is booked once, on the trajectory's first record
                return [record(trajectory, s, dropped=error, usage=usage if i == 0 else ExpertUsage())
                        for i, s in enumerate(steps)]
            by_step = {fix.step: fix for fix in fixes}
            records = []
            for i, step in enumerate(steps):
                share = usage if i == 0 else ExpertUsage()
                fix = by_step.get(step.index)
                records.append(record(trajectory, step, dropped="expert gave no correction for this step",
                                      usage=share) if fix is None
                               else judged(trajectory, step, fix.reason, fix.action, share))
            return records

        workers = 1 if getattr(teacher, "scripted", False) else self.expert_threads
        context = contextvars.copy_context()  # dspy.context settings live in contextvars: carry them over
        total = sum(len(steps) for _, steps in jobs)
        with progress_bar(f"iteration {k}: corrections", total, self.progress) as advance, \
                ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(context.copy().run, correct, job) for job in jobs]
            for future in as_completed(futures):  # each record is saved as soon as it exists
                for correction in future.result():
                    log.append(correction)
                    advance()

    # -- training ------------------------------------------------------------------------------------------

    def _training_rows(self, k: int, current: list[Correction]) -> tuple[list[dict[str, Any]], int]:
        """DAgger's aggregate, bounded: all of this round's records, then earlier rounds' to fill up."""
        usable = [c for c in current if c.dropped is None]
        if self.update != "sft" and k > 0:
            return self._preference_rows(k, usable)
        chosen = list(usable)
        if k > 0:
            # DAgger trains on the aggregate of everything collected so far. A round is bounded, so it takes
            # this round's corrections (at most half the rows: the student's newest mistakes) and fills the
            # rest from all earlier data, demonstrations included, so that what the student already did
            # right is not forgotten while the new states are learned.
            rng = random.Random(self.seed * 1000 + k)
            rng.shuffle(chosen)
            earlier = [c for j in range(k) for c in self._load_corrections(j) if c.dropped is None]
            chosen = chosen[: max(self.max_train_rows // 2, self.max_train_rows - len(earlier))]
            rng.shuffle(earlier)
            chosen += earlier[: self.max_train_rows - len(chosen)]
        budget = self.max_train_rows * 2 if k == 0 else self.max_train_rows
        chosen = balance_by_action(chosen, self.balance_actions, budget, random.Random(self.seed * 31 + k))
        return sft_rows(self._student.step.signature, self._student.adapter, chosen), len(chosen)

    def _preference_rows(self, k: int, usable: list[Correction]) -> tuple[list[dict[str, Any]], int]:
        """Pairs where the expert changed the student's step (this round's first, earlier rounds' to fill up),
        and anchors (`preference_anchor`): a preference round is bounded by `max_train_rows` like an SFT one."""
        rng = random.Random(self.seed * 1000 + k)
        per_pair = 2 if self.update == "kto" else 1  # KTO trains the two sides of a pair as two rows
        n_anchor = round(self.max_train_rows * self.preference_anchor)
        pairs = [c for c in usable if c.changed]
        rng.shuffle(pairs)
        earlier = [c for j in range(1, k) for c in self._load_corrections(j) if c.dropped is None]
        older_pairs = [c for c in earlier if c.changed]
        rng.shuffle(older_pairs)
        pairs = (pairs + older_pairs)[: (self.max_train_rows - n_anchor) // per_pair]
        anchors: list[Correction] = []
        if n_anchor:
            # As many anchor rows as pair rows at most, so the anchors keep the pairs' signal from drowning.
            right = [c for c in usable if not c.changed] + [c for c in earlier if not c.changed]
            right += [c for c in self._load_corrections(0) if c.dropped is None]
            rng.shuffle(right)
            anchors = balance_by_action(right, self.balance_actions, min(n_anchor, len(pairs) * per_pair),
                                        random.Random(self.seed * 31 + k))
        rows = preference_rows(self._student.step.signature, self._student.adapter, pairs, kind=self.update,
                               anchors=anchors)
        return rows, len(pairs) + len(anchors)

    def _load_corrections(self, k: int) -> list[Correction]:
        path = self.run.path / f"iter_{k}" / "corrections.jsonl"
        return list(JsonlLog(path, Correction, key=lambda c: c.key).load().values())

    def _iteration_lr(self) -> float:
        from leap_dspy.train import TrainConfig

        if self.iteration_lr is not None:
            return self.iteration_lr
        config = self.train_config or TrainConfig()
        if self.update != "sft":
            return config.lr_for(self.update)
        return config.lr_for("sft") * ITERATION_LR_SCALE

    def _train(self, rows: list[dict[str, Any]], out: Path, init: Path | None, epochs: float,
               learning_rate: float | None) -> None:
        from leap_dspy.train import TrainConfig, train_dpo, train_kto, train_sft

        if not rows:
            if init is None:
                raise RuntimeError(f"no training rows for {out.parent.name}: every demonstration was dropped")
            # Every correction of this round was dropped (an expert that failed throughout, say): the round
            # keeps the previous weights, says so, and the run goes on with what it has.
            console.print(f"[yellow]{out.parent.name}: no usable corrections; keeping the previous adapter[/yellow]")
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(init, tmp)
            tmp.rename(out)
            atomic_write_json(out.parent / "train.json", {"skipped": "no usable corrections", "adapter_dir": str(out)})
            return
        config = (self.train_config or TrainConfig()).model_copy(update={"epochs": epochs})
        if learning_rate is not None:
            config = config.model_copy(update={"learning_rate": learning_rate})
        trainer = {"sft": train_sft, "dpo": train_dpo, "kto": train_kto}[self.update]
        if "chosen" not in rows[0] and "label" not in rows[0]:
            trainer = train_sft
        console.print(f"{out.parent.name}: fine-tuning on {len(rows)} rows ({trainer.__name__})")
        result = trainer(rows, model=self.model, output_dir=out, init_adapter=str(init) if init else None,
                         config=config)
        atomic_write_json(out.parent / "train.json", result.model_dump())
        release_memory()

    # -- evaluation ----------------------------------------------------------------------------------------

    def _evaluate_stage(self, name: str | int, student: Student, tasks: list[Task], stage_s: float,
                        extra: dict[str, Any], alongside: Episodes | None = None) -> None:
        stage = self.run.stage(name)
        if (stage / "metrics.json").exists():
            return
        start = time.perf_counter()
        log = JsonlLog(stage / "eval.jsonl", Trajectory, key=lambda t: t.task.id)
        jobs = [Episodes(log, tasks, f"evaluate {name}", str(name))] + ([alongside] if alongside else [])
        done = self._play(student, jobs)[0]
        self._write_metrics(stage, name, done, start, stage_s, extra)

    def _expert_reference(self, teacher: dspy.Module, student: Student, tasks: list[Task]) -> None:
        stage = self.run.stage("expert")
        if (stage / "metrics.json").exists():
            return
        start = time.perf_counter()
        log = JsonlLog(stage / "eval.jsonl", Trajectory, key=lambda t: t.task.id)
        done = self._collect(log, tasks, lambda todo, save: expert_rollout(
            teacher, student, self.env, todo, level=self.privilege_level, num_threads=self.expert_threads,
            on_trajectory=save), "evaluate expert")
        self._write_metrics(stage, "expert", done, start, 0.0, {})

    def _write_metrics(self, stage: Path, name: str | int, done: dict[str, Trajectory], start: float,
                       stage_s: float, extra: dict[str, Any]) -> None:
        eval_s = time.perf_counter() - start
        metrics: dict[str, Any] = {"iteration": str(name), **split_metrics(list(done.values()))}
        metrics.setdefault("train_examples", 0)
        metrics.update(extra)
        metrics["eval_s"] = round(eval_s, 1)
        metrics["wall_s"] = round(stage_s + eval_s, 1)  # the whole stage: collecting, training and evaluating
        atomic_write_json(stage / "metrics.json", metrics)
        self.run.write_metrics_csv(with_scores=self._with_scores)
        shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("seen_success", "unseen_success") if k in metrics)
        console.print(f"[bold]{name}[/bold]: {shown}")


def balance_by_action(records: list[Correction], cap: int, budget: int, rng: random.Random) -> list[Correction]:
    """At most `budget` records, in which rarer kinds of action (the action's first word) are repeated up to
    `cap` times (count of the commonest kind / count of this kind, rounded).

    An agent's data is mostly one kind of step (moving on) and its hardest decisions are rare ones (taking
    what the task needs, once per episode): trained on the raw mix, a small student's rare-decision token
    stays near its prior and greedy decoding never picks it. Repeating the rare kinds, then sampling down to
    the same budget, shifts that prior for the same training time. `cap` 1 keeps the raw mix.
    """
    if cap > 1 and records:
        kinds = Counter(_action_kind(r) for r in records)
        top = max(kinds.values())
        records = [r for r in records for _ in range(min(cap, max(1, round(top / kinds[_action_kind(r)]))))]
    if len(records) > budget:
        records = rng.sample(records, budget)
    return records


def _action_kind(record: Correction) -> str:
    return (record.action.split() or [""])[0].split("[")[0].lower()


def call_usage(tracker: Any) -> ExpertUsage:
    """One expert call as `dspy.track_usage` saw it: a call that billed no tokens was served from the cache."""
    prompt = completion = 0
    cost: float | None = None
    for model, entries in tracker.usage_data.items():
        for entry in entries:
            p, c = int(entry.get("prompt_tokens") or 0), int(entry.get("completion_tokens") or 0)
            prompt, completion = prompt + p, completion + c
            price = token_cost_usd(model, p, c)
            if price is not None:
                cost = (cost or 0.0) + price
    billed = bool(tracker.usage_data) and (prompt or completion)
    return ExpertUsage(calls=1, cached=0 if billed else 1, prompt_tokens=prompt, completion_tokens=completion,
                       cost_usd=cost)


@functools.cache
def _litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # the price list it ships, not a download
    import litellm

    return litellm


def token_cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """LiteLLM's price for these tokens on `model`, or None for a model it has no price for (a local one)."""
    if model.startswith("local/"):
        return None
    try:
        prompt_cost, completion_cost = _litellm().cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    except Exception:  # unknown model or provider: no price, not an error
        return None
    return float(prompt_cost + completion_cost)


def expert_usage_metrics(corrections: list[Correction]) -> dict[str, Any]:
    """An iteration's expert bill, from the correction records (so a resumed run still counts every call)."""
    usages = [c.usage for c in corrections if c.usage is not None]
    if not usages:
        return {}
    total = sum(usages, ExpertUsage())
    return {"expert_calls": total.calls, "expert_cached_calls": total.cached,
            "expert_prompt_tokens": total.prompt_tokens, "expert_completion_tokens": total.completion_tokens,
            "expert_tokens": total.prompt_tokens + total.completion_tokens,
            "expert_cost_usd": round(total.cost_usd, 6) if total.cost_usd is not None else None}


def release_memory() -> None:
    """Hand the trainer's freed memory back to the system: without it the process keeps the peak of every
    training round (glibc holds freed heap), and rollouts that follow run with gigabytes less."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def split_metrics(trajectories: list[Trajectory]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for split in ("train", "seen", "unseen"):
        group = [t for t in trajectories if t.task.split == split]
        if not group:
            continue
        metrics[f"{split}_success"] = success_rate(group)
        metrics[f"{split}_score"] = 100.0 * mean_reward(group)
        metrics[f"{split}_episodes"] = len(group)
        metrics[f"{split}_steps"] = sum(len(t.steps) for t in group) / len(group)
    metrics["parse_errors"] = sum(t.num_errors for t in trajectories)
    metrics["snapped_actions"] = sum(t.num_snapped for t in trajectories)
    return metrics


def _follows_student(expert: dspy.Module) -> bool:
    return bool(getattr(expert, "follows_student", False))


def describe_expert(teacher: dspy.Module) -> dict[str, Any]:
    """What the config records about the expert: its class and, for LM experts, the model."""
    info: dict[str, Any] = {"name": type(teacher).__name__}
    lms = [p.lm for p in teacher.predictors() if getattr(p, "lm", None) is not None]
    if lms:
        info["model"] = getattr(lms[0], "model", str(lms[0]))
    if getattr(teacher, "per", "step") != "step":
        info["per"] = teacher.per
    return info
