"""The LEAP teleprompter: behaviour cloning, then rounds of rollouts, privileged corrections, aggregation and
fine-tuning, compiled into LoRA weights for the student's local LM.

It follows DSPy's optimizer shape (`compile(student, trainset=..., teacher=..., valset=...)` returns the
student, pointed at new weights), and differs from `BootstrapFinetune` on one point on purpose: training rows
are formatted with the *student's* signature and inputs, never with the teacher's trace, because the
teacher's inputs hold the privileged state.

This file holds the method (`LEAP.compile`, read as Algorithm 1), its stages and the run folder's bookkeeping.
Each stage calls into the concept's own home: episodes are played by `leap_dspy.rollout` (`play_episodes`, the
one episode runner), corrections are asked and judged in `leap_dspy.corrections`, rows are built and aggregated
in `leap_dspy.training_data`, each stage is evaluated by `leap_dspy.evaluation`, where work runs (processes,
cores, memory) is `leap_dspy.placement`'s, and what config.yaml holds and checks is `leap_dspy.run_config`'s.
"""

from __future__ import annotations

import functools
import json
import random
import time
import typing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter
from rich.markup import escape

from leap_dspy.config import LEAPConfig
from leap_dspy.corrections import (
    Corrector,
    NoDemonstrations,
    collect_corrections,
    demonstration_records,
    few_won,
    nothing_to_clone,
)
from leap_dspy.envs import env_spec
from leap_dspy.envs.base import TextEnv
from leap_dspy.envs.check import check_env
from leap_dspy.evaluation import StageEvaluations
from leap_dspy.lm.engine import LocalEngine
from leap_dspy.lm.models import check_model
from leap_dspy.metrics import describe_expert, round_metrics
from leap_dspy.placement import Owed, Placement
from leap_dspy.programs.agent import Agent
from leap_dspy.programs.experts import OracleExpert, check_expert_call
from leap_dspy.programs.student import Student, check_student, prompt_format
from leap_dspy.progress import console
from leap_dspy.rollout import (
    ROLLOUT_MAX_STUCK,
    Episodes,
    ExpertUnavailable,
    attach_env,
    expert_capture,
    expert_policy,
    play_episodes,
    rollout_samples,
    round_seed,
    student_policy,
)
from leap_dspy.run_config import SCHEMA_VERSION, check_bc_from, read_config, recorded_tasks, start_run
from leap_dspy.run_config import ConfigMismatch as ConfigMismatch  # re-exported: callers catch it from here
from leap_dspy.runs import COMPILED, RunFolder, best_stage, check_adapter, default_run_dir, read_metrics
from leap_dspy.store import JsonlLog, atomic_write_json, atomic_write_text, read_json, yaml_plain
from leap_dspy.trackers import Trackers
from leap_dspy.train.common import RESULT_FILE, check_target_modules, release_memory
from leap_dspy.training_data import (
    AnswerFit,
    aggregate_preference,
    aggregate_sft,
    preference_rows,
    privileged_self_rows,
    sft_rows,
)
from leap_dspy.types import Correction, PrivilegedState, StudentInputs, Task, Trajectory

Rows = list[dict[str, Any]]
_RENAMED = {"train_config": "train", "lm_kwargs": "lm"}  # the keyword names of earlier releases
_NULLABLE = {k for k, f in LEAPConfig.model_fields.items() if type(None) in typing.get_args(f.annotation)}


def as_tasks(examples: Iterable[Any]) -> list[Task]:
    """Accept `Task`s or `dspy.Example(task=Task)`s, the way DSPy optimizers take examples."""
    tasks = []
    for example in examples:
        task = example.task if isinstance(example, dspy.Example) else example
        if not isinstance(task, Task):
            raise TypeError(f"trainset/valset items must be Task or dspy.Example(task=Task), got {type(task)}")
        tasks.append(task)
    return tasks


class LEAP(Teleprompter):
    """Learning from privileged AI feedback (arXiv 2410.05434) as a DSPy teleprompter.

    Args:
        env: the environment the student acts in (its tasks come from `trainset`/`valset`).
        config: every setting of the compile (`LEAPConfig`, or a mapping of its fields, as a YAML file gives
            them); keyword arguments override its fields, as in `LEAP(env, iterations=2, update="dpo")`.
        run_dir: where everything is written; an existing folder with the same configuration is resumed.
        teacher: the expert when `compile` is given none (how `dspy.BetterTogether`, which only passes teachers
            shaped like the student, gets a privileged expert to LEAP); default the scripted expert.
        demonstrator: who plays the behaviour-cloning demonstrations; default the teacher, or the scripted
            expert when the teacher is the student's own privileged self (untrained, it has nothing to show).
    """

    def __init__(self, env: TextEnv, config: LEAPConfig | Mapping[str, Any] | None = None, *,
                 run_dir: str | Path | None = None,
                 teacher: dspy.Module | None = None, demonstrator: dspy.Module | None = None,
                 **settings: Any) -> None:
        super().__init__()
        settings = {_RENAMED.get(k, k): v for k, v in settings.items()}
        # None sets a field that takes None (rollout_tasks=None: every task; iteration_lr=None: derived), as
        # LEAPConfig(...) does; for any other field it means "not given".
        given = {k: v for k, v in settings.items() if v is not None or k in _NULLABLE}
        self.config = LEAPConfig.model_validate({**_settings_of(config), **given}).for_env(env)
        self.env = env
        self.expertise = env.expertise()  # what the records are judged by, and the privileged self's proposals
        env.check_level(self.config.privilege_level)  # an unknown level fails here, before anything runs
        LocalEngine.check_settings(self.config.lm)  # as does a setting the student's engine would refuse
        self.run = RunFolder(run_dir or default_run_dir(env.name))
        self.trackers = Trackers([], self.run.path, self.run.path.name)  # the configured ones open with the run
        self.placement = Placement(self.config, env, self.run.path.name)
        self.teacher, self.demonstrator = teacher, demonstrator

    # -- the method ----------------------------------------------------------------------------------------

    def compile(self, student: Student | Agent, *, trainset: Sequence[Any],
                teacher: dspy.Module | list[dspy.Module] | None = None, valset: Sequence[Any] | None = None,
                **kwargs: Any) -> Student | Agent:
        """Algorithm 1: behaviour cloning, then for each round roll out the student, ask the privileged expert
        to correct every visited step, aggregate with all earlier data and fine-tune; returns `student` (or the
        `Agent` holding it) pointing at the adapter `select` chose (the last round's by default)."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        program, student = (student, student.student) if isinstance(student, Agent) else (student, student)
        check_student(student)  # before anything runs: rows are built from the student's own signature
        train, val = as_tasks(trainset), as_tasks(valset or [])
        self._student = student
        teacher = self.prepare(teacher, train, val)
        self.evaluations = StageEvaluations(self.run, self.config, self.placement, self.trackers, student,
                                            with_scores=self._with_scores)
        started = time.perf_counter()
        self.placement.point(student, None)
        self.reference(student, teacher, val)

        console.print("behaviour cloning: the expert's demonstrations as the student's steps")
        adapter, owed = self.behaviour_cloning(student, teacher, train, val)
        for k in range(1, self.config.iterations + 1):
            if self.run.finished(k):
                owed()  # nothing, unless an earlier stage's metrics were removed
                owed, adapter = Owed(), self.adopt(student, k)
                continue
            console.print(f"round {k}: rollouts, corrections, aggregate, fine-tune")
            round_start = time.perf_counter()
            trajectories = self.rollouts(k, student, teacher, train)
            corrections = self.corrections(k, teacher, trajectories)
            rows, examples = self.aggregate(k, student, corrections)
            # The previous stage's evaluation, owed since its fine-tune, runs beside this one (`Placement`).
            adapter, train_s, overlap_s = self.fine_tune(k, rows, adapter, beside=owed)
            self.placement.point(student, adapter)
            owed = self.evaluations.owed(k, val, time.perf_counter() - round_start - owed.seconds,
                                         {**round_metrics(corrections, trajectories, examples, train_s),
                                          "overlap_s": round(overlap_s, 1)})
        owed()  # the last stage's evaluation: nothing is left to run beside it

        adapter = self.select(student, adapter)
        self.run.write_metrics_csv(with_scores=self._with_scores)
        self.run.write_episodes_csv()
        self.run.write_report(f"LEAP on {self.env.name}", with_scores=self._with_scores)
        self.save(student, adapter)
        self.trackers.close()
        console.print(f"compiled in {time.perf_counter() - started:.0f} s; run folder: {self.run.path}")
        return program

    # -- the stages ----------------------------------------------------------------------------------------

    def behaviour_cloning(self, student: Student, teacher: dspy.Module, train: list[Task], val: list[Task]
                          ) -> tuple[Path, Owed]:
        """The demonstrator plays the training tasks; its steps, formatted as the student's own prompts,
        fine-tune the student (`iter_0`). Returns the adapter and its evaluation, owed to the next stage."""
        if self.run.finished(0):
            return self.adopt(student, 0), Owed()
        started = time.perf_counter()
        demonstrator = self._demonstrator(teacher)
        level = self._demonstration_level(demonstrator)
        record = self.privilege_level if _follows_student(teacher) else None  # a privileged self learns from them
        play = expert_policy(demonstrator, student, self.env, level=level, record_level=record,
                             retries=self.config.expert_retries)
        log = JsonlLog(self.run.stage(0) / "trajectories.jsonl", Trajectory, key=lambda t: t.task.id)
        demos = play_episodes(Episodes(log, train, "demonstrations", play), self.placement.episodes,
                              program=demonstrator, num_threads=self.config.expert_threads,
                              progress=self.config.progress)
        if lost := few_won(demos, self.config.bc_successful_only):
            console.print(f"[yellow]warning:[/yellow] {escape(lost)}")
        records = self.run.corrections_log(0)
        demonstration_records(demos.values(), records, level, self.expertise, self.config.bc_successful_only,
                              self.config.drop_unrealizable)
        current = list(records.load().values())
        if not any(c.dropped is None for c in current):
            raise NoDemonstrations(f"{nothing_to_clone(demos, current, self.config.bc_successful_only)}; see "
                                   f"{log.path}, and once that is mended compile into a new run folder (this one "
                                   "keeps these demonstrations)")
        rows, examples = self.aggregate(0, student, current)
        if _follows_student(teacher):  # the privileged self is these same weights: teach them the expert's part
            ordered = sorted(demos.values(), key=lambda t: t.task.id)
            expert_rows = privileged_self_rows(teacher.signature, teacher.adapter, ordered,
                                               self.config.max_train_rows, random.Random(self.config.seed * 17),
                                               self._propose_reason, self.env.idle_actions, self._answer_fit)
            rows, examples = rows + expert_rows, examples + len(expert_rows)
        adapter, train_s, _ = self.fine_tune(0, rows, None, beside=Owed())
        self.placement.point(student, adapter)
        return adapter, self.evaluations.owed(0, val, time.perf_counter() - started,
                                              round_metrics(current, demos, examples, train_s))

    def rollouts(self, k: int, student: Student, teacher: dspy.Module, train: list[Task]) -> dict[str, Trajectory]:
        """The current student plays a seeded sample of the training tasks, and further samples until the round
        has visited `rollout_steps` steps; each visited step records what the expert will read there."""
        capture_level, capture_oracle = expert_capture(teacher, self.env, self.privilege_level)
        play = student_policy(student, capture_level=capture_level, capture_oracle=capture_oracle,
                              policy=f"student@{k - 1}", max_stuck=ROLLOUT_MAX_STUCK)
        log = JsonlLog(self.run.stage(k) / "trajectories.jsonl", Trajectory, key=lambda t: t.task.id)
        played: dict[str, Trajectory] = {}
        for tasks in rollout_samples(train, self.config.rollout_tasks, round_seed(self.config.seed, k)):
            played |= play_episodes(Episodes(log, tasks, f"round {k}: rollouts", play), self.placement.episodes,
                                    program=student, num_threads=self.config.num_threads,
                                    progress=self.config.progress)
            if sum(len(t.steps) for t in played.values()) >= (self.config.rollout_steps or 0):
                break
        return played

    def corrections(self, k: int, teacher: dspy.Module, trajectories: dict[str, Trajectory]) -> list[Correction]:
        """The privileged expert's reason and action at every visited step, judged and saved one by one."""
        if _follows_student(teacher):
            teacher.follow(self._student)
        corrector = Corrector(teacher, k, self.privilege_level, self.expertise,
                              retries=self.config.expert_retries, drop_unrealizable=self.config.drop_unrealizable)
        threads = 1 if getattr(teacher, "scripted", False) else self.config.expert_threads
        records = collect_corrections(corrector, trajectories, self.run.corrections_log(k), threads,
                                      self.config.progress)
        if corrector.unanswered:  # an outage: stop before training, so that a resume asks these steps again
            raise ExpertUnavailable(f"round {k}: the expert gave no answer for {len(corrector.unanswered)} of "
                                    f"{len(records)} corrections ({corrector.unanswered[0]})")
        why = Counter(c.dropped.splitlines()[0][:160] for c in records if c.dropped)
        if why:  # say it: a round trained on a fraction of its steps looks like any other in metrics.csv
            console.print(f"[yellow]round {k}: {sum(why.values())} of {len(records)} corrections dropped: "
                          + escape("; ".join(f"{n} x {reason}" for reason, n in why.most_common(3))) + "[/yellow]")
        return records

    def aggregate(self, k: int, student: Student, current: list[Correction]) -> tuple[Rows, int]:
        """DAgger: this round's usable records with all earlier ones, bounded, as the student's training rows."""
        # In key order, not the order episodes happened to finish in: a seed then fixes the rows and their order.
        cfg, usable = self.config, sorted((c for c in current if c.dropped is None), key=lambda c: c.key)
        earlier = sorted((c for j in range(k) for c in self.run.corrections(j) if c.dropped is None),
                         key=lambda c: c.key)
        rng, balance_rng = random.Random(cfg.seed * 1000 + k), random.Random(cfg.seed * 31 + k)
        signature, adapter = student.step.signature, student.adapter
        if cfg.update != "sft" and k > 0:
            later = [c for c in earlier if c.iteration > 0]
            right = [c for c in usable + later if not c.changed] + [c for c in earlier if c.iteration == 0]
            pairs, anchors = aggregate_preference(usable, later, right, cfg.max_train_rows, cfg.preference_anchor,
                                                  cfg.update, rng, cfg.balance_actions, balance_rng,
                                                  all_new=cfg.train_all_new)
            rows = preference_rows(signature, adapter, pairs, kind=cfg.update, anchors=anchors,
                                   demos=student.step.demos, fit=self._answer_fit)
            examples = len(pairs) + len(anchors)
        else:
            budget = (cfg.bc_rows or 2 * cfg.max_train_rows) if k == 0 else cfg.max_train_rows
            chosen = aggregate_sft(usable, earlier, budget, rng, cfg.balance_actions, balance_rng,
                                   all_new=cfg.train_all_new)
            rows = sft_rows(signature, adapter, chosen, demos=student.step.demos, fit=self._answer_fit)
            examples = len(chosen)
        return rows, examples

    @functools.cached_property
    def _answer_fit(self) -> AnswerFit:
        """Training answers cut to what the student may write (see `AnswerFit`)."""
        return AnswerFit.of(self.config.model, self.config.lm["max_new_tokens"])

    def fine_tune(self, k: int, rows: Rows, previous: Path | None, beside: Owed) -> tuple[Path, float, float]:
        """LoRA fine-tuning through TRL, continuing from the previous adapter, with `beside` (the previous
        stage's evaluation) run meanwhile or first; (adapter, seconds, seconds the two ran side by side)."""
        from leap_dspy.train import train_dpo, train_kto, train_sft

        out = self.run.stage(k) / "adapter"
        started = time.perf_counter()
        atomic_write_text(out.parent / "train_rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        cut = self._answer_fit.say(len(rows), out.parent.name)  # what building these rows cut
        if (out / "adapter_config.json").exists():  # trained before a kill: its result is in the adapter
            beside()
            recorded = out / RESULT_FILE
            if recorded.exists() and not (out.parent / "train.json").exists():
                atomic_write_json(out.parent / "train.json", {**read_json(recorded), **cut})  # as written below
            return out, float(read_json(recorded).get("wall_s", 0.0)) if recorded.exists() else 0.0, 0.0
        if not rows:
            beside()
            return self.run.keep_adapter(k, previous), 0.0, 0.0
        lr = None if k == 0 else self.config.iteration_learning_rate()
        config = self.config.train.model_copy(update={"epochs": self.config.bc_epochs if k == 0 else
                                                      self.config.epochs, **({"learning_rate": lr} if lr else {}),
                                                      "report_to": list(self.config.report_to)})
        self.trackers.training_dir(k)
        trainer = {"sft": train_sft, "dpo": train_dpo, "kto": train_kto}[self.config.update]
        if "chosen" not in rows[0] and "label" not in rows[0]:
            trainer = train_sft
        console.print(f"{out.parent.name}: fine-tuning on {len(rows)} rows ({trainer.__name__})")
        result, overlap_s = self.placement.fine_tune(trainer, rows, out, previous, config, self._student, beside)
        atomic_write_json(out.parent / "train.json", {**result.model_dump(), **cut})
        release_memory()
        # The training's own seconds: the evaluation's are its stage's, but for those the two ran side by side.
        return out, time.perf_counter() - started - beside.seconds + overlap_s, overlap_s

    def reference(self, student: Student, teacher: dspy.Module, val: list[Task]) -> None:
        """The untrained student and the expert acting itself, evaluated once for the table's reference rows; a
        privileged self has no row of its own (before behaviour cloning it is the untrained student)."""
        if self.config.evaluate_base and val:
            self.evaluations.play("base", student, val, extra={})
        if self.config.evaluate_expert and val and not _follows_student(teacher):
            self.evaluations.play("expert", teacher, val, extra={}, expert_level=self.privilege_level)

    # -- the run folder ------------------------------------------------------------------------------------

    def prepare(self, teacher: dspy.Module | list[dspy.Module] | None, train: list[Task], val: list[Task]
                ) -> dspy.Module:
        """Check everything before the first write, then start (or resume) the run folder; returns the expert,
        given this environment's expertise."""
        if isinstance(teacher, list):
            teacher = teacher[0] if teacher else None
        teacher = attach_env(teacher or self.teacher or OracleExpert(), self.env)
        if not train:
            raise ValueError("trainset is empty")
        self.check_teacher(teacher)
        for warning in check_env(self.env, train[0], self.placement.episodes.clone(),
                                 expert=self._demonstrator(teacher), student=self._student):
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        check_model(self.config.model)
        check_target_modules(self.config.model, self.config.train)
        self.check_student_lm()
        config = self.run_config(teacher, train, val)
        source = check_bc_from(self.config.bc_from, config) if self.config.bc_from is not None else None
        if not self.run.finished(self.config.iterations):  # a round will train on every finished stage's records
            for k in filter(self.run.finished, range(self.config.iterations)):
                self.run.corrections(k)  # refused now, not after the next round's rollouts, if cut since
        start_run(self.run, config)
        self.trackers = Trackers(self.config.report_to, self.run.path, self.run.path.name)
        self.trackers.log_config(config)
        if source is not None:  # its behaviour cloning, and its reference rows where the expert plays at our level
            theirs = read_config(source.config_path)
            same_expert = all(theirs.get(k) == config[k] for k in ("expert", "privilege_level"))
            self.run.copy_stages(source, ["iter_0", "base"] + (["expert"] if same_expert else []))
            console.print(f"behaviour cloning from {source.path}")
        random.seed(self.config.seed)
        return teacher

    def run_config(self, teacher: dspy.Module, train: list[Task], val: list[Task]) -> dict[str, Any]:
        """What `config.yaml` holds: the settings, the environment, the expert and the tasks."""
        return {
            "schema_version": SCHEMA_VERSION,
            "env": {"name": env_spec(self.env), **yaml_plain(self.env.config())},
            **self.config.dump(),
            "student": {**self._student.settings(), **prompt_format(self._student)},
            "expert": describe_expert(teacher),
            "demonstrator": describe_expert(self._demonstrator(teacher)),
            **({"bc_expert_level": self.privilege_level} if _follows_student(teacher) else {}),
            **recorded_tasks(train, val),
        }

    def check_teacher(self, teacher: dspy.Module) -> None:
        """Refuse a teacher that cannot correct at this run's privilege level, before anything runs."""
        check_expert_call(teacher)
        top = max(self.env.privilege_levels)
        levels = getattr(getattr(teacher, "expertise", None), "levels", ())
        if getattr(teacher, "scripted", False) and self.privilege_level < top and self.privilege_level not in levels:
            raise ValueError(f"the scripted expert has no policy at privilege level {self.privilege_level} on "
                             f"{self.env.name} (it follows the oracle at level {top}); use an LM expert there")

    def check_student_lm(self) -> None:
        """Say so when the student arrives with an LM of its own that is not `model`: LEAP fine-tunes and points
        the student at `model` (a DSPy optimizer such as BootstrapFinetune trains the student's own LM)."""
        lms = [p.lm for p in self._student.predictors() if getattr(p, "lm", None) is not None]
        engine = getattr(lms[0], "engine", None) if lms else None
        theirs = getattr(engine, "model", None) or (getattr(lms[0], "model", None) if lms else None)
        if theirs is not None and str(theirs) != str(self.config.model):
            raise ValueError(f"the student's LM is {theirs}, but LEAP trains model={self.config.model!r} and would "
                             "replace it; pass LEAP(model=...) (a local Hugging Face folder, the embedded default or "
                             "tiny-random), or unset the student's LM")

    def save(self, student: Student, adapter: Path | None) -> None:
        """`student.json`, with the local engine on the chosen adapter even when the student acted through a
        server pool: a saved program must load anywhere, and must not send its prompts to recorded servers."""
        saved = student
        if self.config.rollout_servers:
            saved = student.deepcopy()
            saved.set_lm(self.placement.local_lm(adapter))
        saved.save(str(self.run.path / "student.json"))

    def select(self, student: Student, last: Path) -> Path:
        """The round compile returns (`select`): the last, or the best on the seen tasks (`best_stage`);
        recorded in `compiled.json`, which `leap-dspy serve RUN` follows."""
        seen = {str(k): (m["seen_success"], m.get("seen_score", 0.0)) for k in range(self.config.iterations + 1)
                if "seen_success" in (m := read_metrics(self.run.stage(k) / "metrics.json"))}
        best = best_stage(seen) if self.config.select == "best" else None
        stage = int(best) if best is not None else self.config.iterations
        chosen_by = "best seen success" if best is not None else "last round"  # no seen tasks: nothing to choose by
        record = {"stage": stage, "select": self.config.select, "chosen_by": chosen_by, "seen": seen}
        atomic_write_json(self.run.path / COMPILED, record)
        if stage == self.config.iterations:
            return last
        name = "behaviour cloning" if stage == 0 else f"round {stage}"
        console.print(f"compiled student: {name}'s, the best on the seen tasks ((success, score) by stage: {seen})")
        return self.adopt(student, stage)

    def adopt(self, student: Student, k: int) -> Path:
        """A finished stage of an earlier run of this folder: the student takes its adapter and moves on."""
        adapter = check_adapter(self.run.stage(k) / "adapter")
        self.placement.point(student, adapter)
        return adapter

    # -- helpers -------------------------------------------------------------------------------------------

    @property
    def privilege_level(self) -> int:
        """The level the expert corrects at: the configured one, or the environment's default."""
        return self.config.privilege_level

    @property
    def _with_scores(self) -> bool:
        return self.env.reports_score

    def _demonstration_level(self, demonstrator: dspy.Module) -> int:
        """The scripted expert demonstrates with everything it knows, whatever level corrections are made at:
        runs along the privilege dial then share one behaviour cloning, as in the paper's comparison."""
        return max(self.env.privilege_levels) if getattr(demonstrator, "scripted", False) else self.privilege_level

    def _demonstrator(self, teacher: dspy.Module) -> dspy.Module:
        if self.demonstrator is not None:
            return attach_env(self.demonstrator, self.env)
        return attach_env(OracleExpert(), self.env) if _follows_student(teacher) else teacher

    def _propose_reason(self, task: str, observation: str, action: str, history: str) -> str:
        inputs = StudentInputs(task=task, observation=observation, history=history)
        return self.expertise.explain(inputs, PrivilegedState(level=0), action)


def _settings_of(config: LEAPConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a `config` argument sets: a `LEAPConfig`'s, or a mapping's, as `LEAPConfig(**mapping)` takes
    them (the keyword names of earlier releases included)."""
    if config is None:
        return {}
    if isinstance(config, LEAPConfig):
        return config.model_dump(exclude_unset=True)
    if isinstance(config, Mapping):
        return {_RENAMED.get(k, k): v for k, v in config.items()}
    raise TypeError(f"LEAP's config is a LEAPConfig or a mapping of its settings, not {type(config).__name__}")


def _follows_student(expert: dspy.Module) -> bool:
    """A privileged self: it shares the student's weights and is trained for the expert's part too."""
    return bool(getattr(expert, "follows_student", False))
