"""The experiment trackers people already use (`report_to`): TensorBoard, MLflow and Weights & Biases.

TRL sends each fine-tune's training curves to them (its own `report_to`); a `Trackers` sends LEAP's side: the
run's configuration once, and each stage's metrics (success, scores, corrections, times) as the compile
writes them. Everything works offline: TensorBoard files and a local MLflow store in the run folder, wandb in
offline mode, unless the usual environment variables (`MLFLOW_TRACKING_URI`, `WANDB_MODE`) say otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "wandb")
REFERENCE_STEP = {"base": -1, "expert": -1}
"""The reference rows are logged under their own names at step -1, before behaviour cloning (step 0)."""


MLFLOW_PARENT = "LEAP_DSPY_MLFLOW_PARENT_RUN"
"""The LEAP run's MLflow id, for a fine-tune in its own process to make active before TRL's callback nests."""


class Trackers:
    """The trackers a run reports to, as one object: `log_config`, `log_stage`, `close`."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str) -> None:
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
        self.names, self.run_dir, self.run_name = list(dict.fromkeys(names)), run_dir, run_name
        self._writer: Any = None
        self._mlflow: Any = None
        self._mlflow_run = ""
        self._wandb: Any = None
        self.environment()
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard" / "leap"))
        if "mlflow" in self.names:
            import mlflow

            mlflow.set_experiment("leap-dspy")
            self._mlflow = mlflow.MlflowClient()
            self._mlflow_run = self._start_mlflow(mlflow, run_name)
        if "wandb" in self.names:
            import wandb

            self._wandb = wandb
            wandb.init(project="leap-dspy", name=run_name, group=run_name, dir=str(run_dir), reinit="finish_previous")

    def _start_mlflow(self, mlflow: Any, run_name: str) -> str:
        """The compile's MLflow run: a resumed compile continues the run it started (its id kept in the run
        folder), so one compile is one run however often it was resumed."""
        saved = self.run_dir / "mlflow_run_id"
        run_id = saved.read_text().strip() if saved.exists() else ""
        try:
            active = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name)
        except mlflow.exceptions.MlflowException:  # another store (MLFLOW_TRACKING_URI), or a cleared one
            active = mlflow.start_run(run_name=run_name)
        saved.write_text(active.info.run_id)
        return str(active.info.run_id)

    def environment(self) -> None:
        """Offline defaults for these trackers and for TRL's callbacks, unless already set: a run-local MLflow
        store (each fine-tune a nested run), wandb offline in the run folder."""
        if "mlflow" in self.names:
            if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store needs no server nor database
                os.environ["MLFLOW_TRACKING_URI"] = (self.run_dir / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            os.environ["MLFLOW_NESTED_RUN"] = "true"
        if "wandb" in self.names:
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
            os.environ.setdefault("WANDB_SILENT", "true")

    def training_dir(self, stage: str | int) -> None:
        """Before a fine-tune: where TRL's TensorBoard callback writes its curves, and this run active again in
        MLflow for TRL's callback to nest under (the callback ends it when it is garbage collected)."""
        if "tensorboard" in self.names:
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.run_dir / "tensorboard" / f"train-{stage}")
        if self._mlflow is not None:
            import mlflow

            if mlflow.active_run() is None:
                mlflow.start_run(run_id=self._mlflow_run)
            os.environ[MLFLOW_PARENT] = self._mlflow_run  # a launched fine-tune nests its run under this one too
        if self._wandb is not None:  # a launched fine-tune's curves: a run in this run's group (wandb's way)
            os.environ["WANDB_RUN_GROUP"] = self._wandb.run.group

    def log_config(self, config: dict[str, Any]) -> None:
        flat = _flatten(config)
        if self._writer is not None:
            import yaml

            self._writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```")
        if self._mlflow is not None:
            logged = self._mlflow.get_run(self._mlflow_run).data.params  # a resumed compile's run has them
            for key, value in flat.items():
                if key in ("trainset", "valset") or logged.get(key) == str(value)[:500]:
                    continue
                if key in logged:  # a setting a resume may change (iterations): params are written once
                    self._mlflow.set_tag(self._mlflow_run, key, str(value)[:500])
                else:
                    self._mlflow.log_param(self._mlflow_run, key, str(value)[:500])
        if self._wandb is not None:
            self._wandb.config.update({k: v for k, v in flat.items() if k not in ("trainset", "valset")},
                                      allow_val_change=True)

    def log_stage(self, stage: str, metrics: dict[str, Any]) -> None:
        """One stage's numeric metrics: rounds under `leap/` at their number, base and expert under their name."""
        step = REFERENCE_STEP.get(stage, int(stage) if stage.isdigit() else -1)
        prefix = "leap" if stage.isdigit() else f"reference/{stage}"
        numbers = {f"{prefix}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._writer is not None:
            for key, value in numbers.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._mlflow is not None:
            for key, value in numbers.items():
                self._mlflow.log_metric(self._mlflow_run, key, value, step=max(step, 0))
        if self._wandb is not None:
            self._wandb.log({**numbers, "leap/stage": step})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._mlflow is not None:
            import mlflow

            while mlflow.active_run() is not None:
                mlflow.end_run()
            self._mlflow.set_terminated(self._mlflow_run)
        if self._wandb is not None:
            self._wandb.finish()
        for name in (MLFLOW_PARENT, "WANDB_RUN_GROUP"):  # this run's, not a later one's
            os.environ.pop(name, None)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
