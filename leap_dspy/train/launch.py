"""One fine-tune as its own program, for a launcher to run on many processes, GPUs or nodes.

    accelerate launch --config_file examples/accelerate/one-node-fsdp.yaml -m leap_dspy.train.launch \\
        --method sft --rows train_rows.jsonl --model MODEL --output-dir adapter [--init-adapter DIR] \\
        [--config train_config.json]
    torchrun --nproc_per_node 2 -m leap_dspy.train.launch ...      # processes on a CPU (gloo)

TRL's trainers run distributed by themselves under `accelerate launch` or `torchrun` (DDP, or FSDP/DeepSpeed as
an accelerate config file says); only the main process publishes the adapter (`common.atomic_output_dir`),
with its `TrainResult` inside. `launch_command` builds this line for `LEAP(train_launcher=...)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

LAUNCHED_BY = "LEAP_DSPY_LAUNCHED_BY"
"""The environment variable holding the process id of the compile that launched a fine-tune."""


def launcher_program(launcher: list[str]) -> str:
    """The launcher's executable: `python` is this interpreter, another is looked up on PATH, then beside this
    Python; a `ValueError` names a launcher found in neither, before a run starts rather than at its first
    fine-tune."""
    if launcher[0] == "python":
        return sys.executable
    program = shutil.which(launcher[0]) or shutil.which(launcher[0], path=str(Path(sys.executable).parent))
    if program is None:
        raise ValueError(f"train_launcher {' '.join(launcher)!r}: no program {launcher[0]!r} on PATH or beside "
                         f"{sys.executable}")
    return program


def launch_command(launcher: list[str], method: str, rows: Path, model: str, output_dir: Path,
                   init_adapter: Path | None, config_file: Path) -> list[str]:
    """`launcher` (e.g. `["torchrun", "--nproc_per_node", "2"]`) running one fine-tune whose TrainConfig is in
    `config_file` (see `launcher_program`)."""
    command = [launcher_program(launcher), *launcher[1:], "-m", "leap_dspy.train.launch", "--method", method,
               "--rows", str(rows), "--model", model, "--output-dir", str(output_dir), "--config", str(config_file)]
    return command + (["--init-adapter", str(init_adapter)] if init_adapter else [])


def main(argv: list[str] | None = None) -> None:
    from leap_dspy.train import TrainConfig, train_dpo, train_kto, train_sft

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("sft", "dpo", "kto"), required=True)
    ap.add_argument("--rows", type=Path, required=True, help="JSONL training rows, as LEAP writes them")
    ap.add_argument("--model", required=True)
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--init-adapter", type=Path)
    ap.add_argument("--config", type=Path, help="a TrainConfig as JSON")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    config = TrainConfig.model_validate_json(args.config.read_text()) if args.config else TrainConfig()
    train = {"sft": train_sft, "dpo": train_dpo, "kto": train_kto}[args.method]
    _end_with_the_compile()
    _resume_mlflow_parent()
    train(rows, model=args.model, output_dir=args.output_dir, init_adapter=args.init_adapter, config=config)


def _end_with_the_compile() -> None:
    """A fine-tune the compile itself started (not through torchrun or accelerate, whose agent is its parent) is
    sent SIGTERM if the compile dies, on Linux: a killed compile leaves no orphan training on, which a resume
    would find holding the run folder (`runs.hold`)."""
    compile_pid = os.environ.get(LAUNCHED_BY)
    if not sys.platform.startswith("linux") or compile_pid is None or os.getppid() != int(compile_pid):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(compile_pid):  # the compile died before the line above
        sys.exit("the compile that launched this fine-tune is gone")


def _resume_mlflow_parent() -> None:
    """The compile's MLflow run made active here, as it is in the compile, so that TRL's callback nests its run
    under it (`MLFLOW_NESTED_RUN`)."""
    from leap_dspy.trackers import MLFLOW_PARENT

    if os.environ.get(MLFLOW_PARENT):
        import mlflow

        mlflow.start_run(run_id=os.environ[MLFLOW_PARENT])


if __name__ == "__main__":
    main()
