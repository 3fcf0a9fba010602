"""The least time a compile's arithmetic allows on this machine, stage by stage, against the time it took.

For each stage of a finished run: the tokens its student pushed through the model (rollouts and evaluations:
each distinct prompt once, as the engine remembers greedy answers, less the prefix every prompt of the stage
shares, which the prefix cache computes once a batch; fine-tunes: every row, less the shared head once a batch
of `per_device_batch_size` rows, as `share_prompt` trains it), their FLOPs in the linear layers (2 a parameter
and token to generate, 4 to train: forward and input gradients; attention and LoRA's own products left out, so
this is a floor), and the seconds those take at the best matmul rate measured here, in the dtype the engine
picks. "of the limit" is that floor over the seconds the stage's work took (`bench/profile_run.py`'s split; a
fine-tune's own seconds, also where it trained beside an evaluation on part of the cores); the last row sets the
floor of every stage against the stages' walls.
The scripted expert's demonstrations and corrections cost no model arithmetic and are not counted.

Usage: python bench/floor.py RUN_DIR [--threads N] [--rate-gflops R]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from matmul_peak import best_matmul_flops  # noqa: E402 - bench/, beside this script
from profile_run import stage_name, stage_rows, stage_seconds  # noqa: E402


def common_prefix(sequences: list[list[int]]) -> int:
    if not sequences:
        return 0
    first, n = sequences[0], min(map(len, sequences))
    return next((i for i in range(n) if any(s[i] != first[i] for s in sequences)), n)


class Counter:
    """Tokens of chat rows (a prompt's messages and its answer) as the student's model reads them."""

    def __init__(self, model: str) -> None:
        from leap_dspy.lm.models import load_tokenizer

        self.tokenizer = load_tokenizer(model)

    def tokens(self, row: dict) -> tuple[list[int], int]:
        """(the prompt's token ids, the answer's token count)."""
        render = self.tokenizer.apply_chat_template
        prompt = self.tokenizer(render(row["prompt"], tokenize=False, add_generation_prompt=True)).input_ids
        full = self.tokenizer(render(row["prompt"] + row["completion"], tokenize=False)).input_ids
        return prompt, len(full) - len(prompt)


def played(counter: Counter, student: object, files: list[Path]) -> tuple[int, int]:
    """(tokens through the model, answer tokens) of the student's steps in these episode logs."""
    from leap_dspy.training_data import sft_rows
    from leap_dspy.types import Trajectory
    from signatures import StudentStep

    steps = [step for path in files if path.exists() for line in path.read_text().splitlines() if line.strip()
             for step in Trajectory.model_validate_json(line).steps]
    rows = sft_rows(StudentStep, student.adapter, steps)  # type: ignore[arg-type] - a Step reads as a Correction
    distinct = {json.dumps(row["prompt"]): row for row in rows}  # a repeated prompt is answered from memory
    counted = [counter.tokens(row) for row in distinct.values()]
    shared = common_prefix([prompt for prompt, _ in counted])
    batches = len({step.index for step in steps})  # the engine's batches: one a step of the episodes at once
    answers = sum(c for _, c in counted)
    return sum(len(p) for p, _ in counted) - shared * (len(counted) - batches) + answers, answers


def trained(counter: Counter, stage: Path) -> tuple[int, int]:
    """(tokens through the model, answer tokens) of a fine-tune's rows, the shared head once a batch."""
    rows = [json.loads(line) for line in (stage / "train_rows.jsonl").read_text().splitlines() if line.strip()]
    batch = json.loads((stage / "train_config.json").read_text()).get("per_device_batch_size", 8)
    counted = [counter.tokens(row) for row in rows]
    shared = common_prefix([prompt for prompt, _ in counted])
    through = sum(len(p) + c for p, c in counted) - shared * (len(rows) - math.ceil(len(rows) / batch))
    return through, sum(c for _, c in counted)


def stage_work(counter: Counter, student: object, run: Path, iteration: str) -> dict[str, tuple[int, int]]:
    """A stage's tokens by kind of work; behaviour cloning's playing is the scripted expert's."""
    stage = run / f"iter_{iteration}"
    rollouts = played(counter, student, [stage / "trajectories.jsonl"]) if iteration != "0" else (0, 0)
    return {"play + correct": rollouts, "train": trained(counter, stage),
            "evaluate": played(counter, student, [stage / "eval.jsonl", stage / "eval_snapped.jsonl"])}


def parameters(model: str) -> tuple[int, int]:
    """(the parameters every token goes through, the vocabulary head's), from the model's config."""
    from transformers import AutoConfig

    from leap_dspy.lm.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter
    return layers * per_layer, config.vocab_size * hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="threads for the matmul rate (default: all)")
    parser.add_argument("--rate-gflops", type=float, default=None, help="use this rate instead of measuring one")
    args = parser.parse_args()
    import torch

    from leap_dspy.lm.models import pick_dtype
    from leap_dspy.programs import Student
    from leap_dspy.run_config import read_config

    config = read_config(args.run / "config.yaml")
    model = config["model"]
    student = Student(**Student.init_args(config["student"]))  # its prompts' format; no weights needed
    dtype = str(pick_dtype("auto")).removeprefix("torch.")
    rate = args.rate_gflops * 1e9 if args.rate_gflops else best_matmul_flops(
        dtype, (512, 1024, 2048), threads=args.threads or torch.get_num_threads())[0]
    body, head = parameters(model)
    counter = Counter(model)
    table = Table(title=f"{args.run.name}: the arithmetic floor at {rate / 1e9:.0f} GFLOP/s ({dtype} matmul)")
    for column in ("stage", "work", "tokens through", "answer tokens", "TFLOP", "floor s", "took s",
                   "of the limit"):
        table.add_column(column, justify="right")
    rows = stage_rows(args.run)
    floor_total, wall = 0.0, sum(sum(stage_seconds(row).values()) for row in rows)
    for row in (row for row in rows if row["iteration"].isdigit()):
        took = stage_seconds(row)
        for kind, (through, answers) in stage_work(counter, student, args.run, row["iteration"]).items():
            flops = (4 if kind == "train" else 2) * (body * through + head * answers)
            seconds = float(row.get("train_s") or 0) if kind == "train" else took[kind]
            floor_total += flops / rate
            share = f"{100 * flops / rate / seconds:.0f}%" if seconds else ""
            table.add_row(stage_name(row["iteration"]), kind, f"{through:,}", f"{answers:,}",
                          f"{flops / 1e12:.1f}", f"{flops / rate:.0f}", f"{seconds:.0f}", share)
    table.add_row("all", "stages' walls", "", "", "", f"{floor_total:.0f}", f"{wall:.0f}",
                  f"{100 * floor_total / wall:.0f}%", style="bold")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
