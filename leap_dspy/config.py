"""One object for everything a LEAP compile is configured by, in the spirit of TRL's `SFTConfig`.

`config.yaml` is its dump (with the run's environment, expert and tasks beside it), the CLI's defaults are its
defaults, and the fields marked `bc` are what behaviour cloning depends on: runs that agree on them may share
one behaviour cloning (`bc_from`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from leap_dspy.lm import DEFAULT_MODEL
from leap_dspy.train import TrainConfig

Update = Literal["sft", "dpo", "kto"]

ITERATION_LR_SCALE = 0.1
"""The rounds after behaviour cloning continue an adapter that already fits the format, so they fine-tune
gently, at a tenth of behaviour cloning's rate, to keep what it learned (docs/results.md)."""


def _bc(**kwargs: Any) -> Any:
    """A field behaviour cloning depends on."""
    return Field(json_schema_extra={"bc": True}, **kwargs)


class LEAPConfig(BaseModel):
    """Settings of a LEAP compile. Each field's description is its CLI help."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    iterations: int = Field(2, ge=0, description="LEAP rounds after behaviour cloning")
    update: Update = Field("sft", description="how corrections become weights: sft, or dpo/kto (correction "
                           "preferred over the student's step)")
    model: str = _bc(default=DEFAULT_MODEL, description="the student's base weights: the embedded default, a "
                     "local Hugging Face folder, or tiny-random (a 2-layer random model, to try a setting in seconds)")
    privilege_level: int | None = Field(None, description="how much privileged state the expert sees (the "
                                        "environment documents its levels); None: the environment's default")
    bc_epochs: float = _bc(default=1.0, gt=0, description="epochs of behaviour cloning")
    epochs: float = Field(1.0, gt=0, description="epochs of each LEAP round")
    iteration_lr: float | None = Field(None, ge=0, description="learning rate of the rounds (None: a tenth of "
                                       "behaviour cloning's for sft, the method's own for dpo/kto)")
    preference_anchor: float = Field(0.5, ge=0, lt=1, description="share of a dpo/kto round's rows that are "
                                     "steps known to be right, trained toward (0: pairs alone)")
    max_train_rows: int = _bc(default=240, ge=1, description="rows per LEAP round (behaviour cloning takes "
                              "twice as many): this round's corrections, then earlier data to fill up")
    bc_rows: int | None = _bc(default=None, ge=1, description="rows of behaviour cloning, sampled from the "
                              "demonstrated steps (unset: twice max_train_rows)")
    train_all_new: bool = Field(True, description="train on every new correction of a round (DAgger; the rows "
                                "grow past max_train_rows), older data filling up; false caps new ones at half")
    select: Literal["last", "best"] = Field("last", description="the round compile returns: the last "
                                           "(Algorithm 1), or best, the one with the highest success on the seen "
                                           "validation tasks, ties to the later (DAgger's best policy on validation)")
    rollout_tasks: int | None = Field(12, ge=1, description="training tasks the student plays per round (a "
                                      "seeded sample; all when unset)")
    rollout_steps: int | None = Field(None, ge=1, description="play further samples of rollout_tasks until the "
                                      "round has visited this many steps (short episodes give few corrections); "
                                      "unset: one sample")
    bc_successful_only: bool = _bc(default=True, description="clone only demonstrations that succeeded")
    balance_actions: int = _bc(default=2, ge=1, description="repeat rarer kinds of action up to this many "
                               "times within the row budget (1: the raw mix)")
    drop_unrealizable: bool = _bc(default=False, description="keep records whose reason names what the student "
                                    "never saw, or whose action only privileged facts justify, out of training")
    num_threads: int = Field(64, ge=1, description="episodes played at once")
    expert_threads: int = Field(8, ge=1, description="concurrent calls to an LM expert")
    expert_retries: int = Field(3, ge=1, description="attempts per expert call before the failure is recorded")
    evaluate_base: bool = Field(False, description="evaluate the untrained student (off: it cannot follow the "
                                "format and scores 0, while answering to the token limit makes it a slow evaluation)")
    evaluate_expert: bool = Field(True, description="evaluate the expert acting itself (not a privileged self, "
                                  "which before behaviour cloning is the untrained student)")
    evaluate_snapped: bool = Field(True, description="beside strict success (actions run as written), report "
                                   "success with near misses snapped to an admissible action")
    evaluate_beside_training: bool | None = Field(None, description="evaluate a stage while the next round's "
                                                  "launched fine-tune trains, the CPU's cores split between the "
                                                  "two (they do not depend on each other); unset: on a CPU of two "
                                                  "cores or more computing in bf16 where both fit "
                                                  "`memory_budget_gb` (the evaluation's KV cache capped to fit if "
                                                  "need be); never on a float32 CPU, whose cores both keep busy, "
                                                  "or a GPU")
    episode_processes: int | None = Field(None, ge=1, description="processes that play a stage's evaluation where "
                                          "nothing runs beside the engine (the last, or all on a float32 CPU), "
                                          "each on its share of the cores; unset: 2 on a CPU of two cores or "
                                          "more computing in bf16, whose engine gains little from a second thread, "
                                          "else 1")
    memory_budget_gb: float | None = Field(None, gt=0, description="the most GiB an evaluation and the fine-tune "
                                           "beside it may hold together, judged from the last trainer's peak "
                                           "and the compile's; unset: 8 or half the machine's memory, whichever "
                                           "is less")
    lm: dict[str, Any] = _bc(default_factory=lambda: {"no_repeat_ngram": 12, "ngram_repeats": 2},
                             description="settings of the student's local engine (`LocalEngine`)")
    train: TrainConfig = _bc(default_factory=TrainConfig, description="LoRA fine-tuning hyper-parameters")
    train_launcher: list[str] = Field(default_factory=lambda: ["python"], description="run each fine-tune as its "
                                      "own process under this launcher: 'python' (one fresh process, so that the "
                                      "compile never keeps a trainer's memory), 'torchrun --nproc_per_node 2' "
                                      "(CPU, gloo) or 'accelerate launch --config_file fsdp.yaml'; '': in this "
                                      "process")

    ray: str | None = Field(None, description="step environments in Ray actors: 'local' (start Ray on this "
                            "machine), 'auto' (the running cluster) or a cluster address; none: threads here")
    ray_workers: int | None = Field(None, ge=1, description="environment actors (default: the cluster's CPUs)")
    rollout_servers: list[str] = Field(default_factory=list, description="OpenAI-compatible servers (vLLM, "
                                       "leap-dspy serve) the student acts through, each round's adapter loaded "
                                       "into each; none: in this process. Their key: LEAP_DSPY_API_KEY")
    report_to: list[str] = Field(default_factory=list, description="experiment trackers for LEAP's per-stage "
                                 "metrics, the config and TRL's training curves: tensorboard, mlflow, wandb "
                                 "(offline: stores in the run folder)")
    seed: int = _bc(default=0, description="seeds task samples, row selection and training")
    progress: bool = Field(True, description="progress bars")
    bc_from: Path | None = Field(None, description="a finished run folder whose behaviour cloning this run "
                                 "starts from (it must agree on every behaviour-cloning setting)")

    @field_validator("train_launcher", mode="before")
    @classmethod
    def _split_launcher(cls, value: Any) -> Any:
        import shlex

        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        from leap_dspy.trackers import TRACKERS

        unknown = [name for name in value if name not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
        return value

    @field_validator("lm", mode="before")
    @classmethod
    def _lm_defaults(cls, value: dict[str, Any] | None) -> dict[str, Any]:
        """`max_new_tokens`, unless given, is the environment's `answer_tokens` (set by `LEAP`); a 12-token run
        said a third time ends a greedy 135M student's loop, and saying one twice is what an INTERSECT query
        or a reason naming its query needs."""
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"lm must be a mapping of engine settings, not {type(value).__name__}")
        return {"no_repeat_ngram": 12, "ngram_repeats": 2, **(value or {})}

    @classmethod
    def bc_keys(cls) -> tuple[str, ...]:
        return tuple(name for name, f in cls.model_fields.items()
                     if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("bc"))

    def memory_budget_mb(self, machine_mb: float) -> float:
        """`memory_budget_gb` in MiB, or its default on a machine of `machine_mb`."""
        return self.memory_budget_gb * 1024 if self.memory_budget_gb else min(8 * 1024, machine_mb / 2)

    def iteration_learning_rate(self) -> float:
        if self.iteration_lr is not None:
            return self.iteration_lr
        if self.update != "sft":
            return self.train.lr_for(self.update)
        return self.train.lr_for("sft") * ITERATION_LR_SCALE

    def for_env(self, env: Any) -> LEAPConfig:
        """These settings with what `env` (an environment or its class) decides where they leave it open: the
        answer budget and the privilege level."""
        level = env.default_privilege_level if self.privilege_level is None else self.privilege_level
        return self.model_copy(update={"lm": {"max_new_tokens": env.answer_tokens, **self.lm},
                                       "privilege_level": level})

    def dump(self) -> dict[str, Any]:
        """The YAML-ready settings: paths as strings; a preference anchor only where it applies."""
        data = self.model_dump(mode="json", exclude={"progress"})
        data["train"].pop("report_to", None)  # LEAP's own `report_to` decides it for every fine-tune
        data["iteration_lr"] = self.iteration_learning_rate()
        if self.bc_from is not None:
            data["bc_from"] = str(self.bc_from.resolve())
        if self.update == "sft":
            data.pop("preference_anchor")
        return data
