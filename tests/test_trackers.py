"""`report_to`: LEAP's per-stage metrics, the config and TRL's training curves reach TensorBoard, MLflow and
wandb, offline, in stores inside the run folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from leap_dspy.programs import OracleExpert, Student
from leap_dspy.teleprompt import LEAP
from leap_dspy.trackers import Trackers
from leap_dspy.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.keybox import KeyBox  # noqa: E402

TINY = {"num_boxes": 3, "num_train": 3, "num_seen": 1, "num_unseen": 1, "max_steps": 8}
FAST_TRAIN = TrainConfig(max_length=512, per_device_batch_size=8, gradient_accumulation=1, progress_bar=False)


def test_unknown_tracker_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tracker 'neptune'"):
        Trackers(["neptune"], tmp_path, "run")


def test_a_compile_reports_to_local_tensorboard_mlflow_and_wandb(tiny_model: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    for name in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_DIR", "TENSORBOARD_LOGGING_DIR", "MLFLOW_NESTED_RUN",
                 "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    env, run = KeyBox(**TINY), tmp_path / "run"
    leap = LEAP(env, iterations=1, model=tiny_model, run_dir=run, train_config=FAST_TRAIN, num_threads=4,
                lm_kwargs={"max_new_tokens": 16}, progress=False, evaluate_base=False,
                report_to=["tensorboard", "mlflow", "wandb"])
    leap.compile(Student(), trainset=env.tasks("train"), teacher=OracleExpert(),
                 valset=env.tasks("seen") + env.tasks("unseen"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    leap_events = EventAccumulator(str(run / "tensorboard" / "leap")).Reload()
    assert [e.step for e in leap_events.Scalars("leap/unseen_success")] == [0, 1]
    assert leap_events.Scalars("reference/expert/unseen_success")[0].value == 1.0
    curves = EventAccumulator(str(run / "tensorboard" / "train-1")).Reload()
    assert any(tag.endswith("loss") for tag in curves.Tags()["scalars"])  # TRL's curve of round 1

    mlflow.set_tracking_uri((run / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["leap-dspy"], output_format="list")
    parent = next(r for r in runs if r.info.run_name == "run")
    assert parent.data.metrics["leap/unseen_success"] in (0.0, 1.0) and parent.data.params["update"] == "sft"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all("train_loss" in r.data.metrics or "loss" in r.data.metrics for r in children)

    # the compile's run, and one per fine-tune (each in its own process) in its group: wandb's multi-process way
    offline = list((run / "wandb").glob("offline-run-*/*.wandb"))
    assert len(offline) == 3 and all(p.stat().st_size > 0 for p in offline)

    # extended by one round (as a resume after a kill is): the same MLflow run, a third fine-tune nested in it
    LEAP(env, iterations=2, model=tiny_model, run_dir=run, train_config=FAST_TRAIN, num_threads=4,
         lm_kwargs={"max_new_tokens": 16}, progress=False, evaluate_base=False, report_to=["mlflow"]).compile(
        Student(), trainset=env.tasks("train"), teacher=OracleExpert(), valset=env.tasks("seen") + env.tasks("unseen"))
    runs = mlflow.search_runs(experiment_names=["leap-dspy"], output_format="list")
    assert [r.info.run_id for r in runs if r.info.run_name == "run"] == [parent.info.run_id]
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 3
