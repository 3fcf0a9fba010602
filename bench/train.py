"""Benchmark: LoRA SFT (or DPO, KTO) throughput on the embedded SmolLM2-135M against this machine's best matmul rate.

    python bench/train.py [--rows 64] [--dtype auto] [--batch 8] [--accumulation 1] [--max-batch-tokens 0]
                          [--attn sdpa|eager] [--turns 25] [--model DIR]
                          [--compile] [--liger] [--share-prompt on|off|both] [--fused-lora on|off|both]
                          [--fused-loss on|off] [--fused-layers on|off]
                          [--method sft|dpo|kto] [--head-positions completions|all|both]
                          [--rows-file RUN/iter_0/train_rows.jsonl] [--profile]

Prints one table, all measured in this run: the best square-matmul FLOP/s in float32 and bfloat16, SFT train
tokens/s with the default TrainConfig on realistic agent-step rows (~300-token prompt, ~40-token completion),
the model-FLOPs fraction (tokens/s x 6 x parameters / best matmul FLOP/s) and peak RSS.
`--method dpo|kto` trains the same rows as preferences (each row's answer chosen, or desirable, against another
row's), counting tokens as the trainer does (a DPO row's prompt twice); `--head-positions all` runs TRL's fused
head over every position, as TRL does on a CPU, against the completions alone (the default here).
The 6 x parameters convention counts a full backward; with LoRA the frozen weights need no weight gradients,
so the true work per token is nearer 4 x parameters and the fraction overstates hardware use by ~1.5x.
Tokens are the rows' tokens: with the shared prompt head (`TrainConfig.share_prompt`) fewer of them run through
the model, so the fraction is that of the work a plain forward would do.
With a CUDA GPU present, the matmuls and the training run on it. `--profile` adds where the training's CPU
time went, by kind of operation (`op_profile.py`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
from contextlib import nullcontext
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matmul_peak import best_matmul_flops, peak_dtypes  # noqa: E402 - bench/, beside this script
from op_profile import format_profile, op_profile  # noqa: E402

FIELDS_SYSTEM = """Your input fields are:
1. `task` (str): The household task to accomplish.
2. `observation` (str): What the agent sees after its last action.
3. `history` (str): The previous actions and observations, most recent last.
Your output fields are:
1. `reason` (str): Why the next action, from what has been observed.
2. `action` (str): The next command in the environment's grammar.
All interactions will be structured in the following way, with the appropriate values filled in.

[[ ## task ## ]]
{task}

[[ ## observation ## ]]
{observation}

[[ ## history ## ]]
{history}

[[ ## reason ## ]]
{reason}

[[ ## action ## ]]
{action}

[[ ## completed ## ]]
In adhering to this structure, your objective is: choose the next action of a household agent."""

OBJECTS = ["apple", "mug", "book", "keychain", "pencil", "cellphone", "bowl", "plate", "vase", "remotecontrol"]
RECEPTACLES = ["desk", "drawer", "shelf", "countertop", "cabinet", "sidetable", "dresser", "garbagecan", "fridge"]


def agent_rows(n: int, seed: int = 0, turns: int | None = None) -> list[dict]:
    """Rows shaped like DSPy ChatAdapter.format_finetune_data output for one agent step; `turns` earlier steps
    in each history (default 0-2), for rows as long as WebShop's or a late ALFWorld step's."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        obj, rec = rng.choice(OBJECTS), rng.choice(RECEPTACLES)
        seen = ", ".join(f"a {rng.choice(RECEPTACLES)} {rng.randint(1, 4)}" for _ in range(rng.randint(2, 5)))
        history = "\n".join(
            f"> go to {rng.choice(RECEPTACLES)} {rng.randint(1, 4)}\nOn it, you see a {rng.choice(OBJECTS)} "
            f"{rng.randint(1, 3)}, and a {rng.choice(OBJECTS)} {rng.randint(1, 3)}."
            for _ in range(rng.randint(0, 2) if turns is None else turns)
        )
        user = (
            f"[[ ## task ## ]]\nYour task is to: put a {obj} in {rec}.\n\n"
            f"[[ ## observation ## ]]\nYou are in the middle of a room. Looking quickly around you, you see {seen}.\n\n"
            f"[[ ## history ## ]]\n{history}\n\n"
            "Respond with the corresponding output fields, starting with the field `[[ ## reason ## ]]`, then "
            "`[[ ## action ## ]]`, and then ending with the marker for `[[ ## completed ## ]]`."
        )
        target = f"{rng.choice(RECEPTACLES)} {rng.randint(1, 4)}"
        answer = (
            f"[[ ## reason ## ]]\nThe {obj} may be on the {target.split()[0]}, not checked yet.\n\n"
            f"[[ ## action ## ]]\ngo to {target}\n\n[[ ## completed ## ]]"
        )
        rows.append(
            {
                "prompt": [{"role": "system", "content": FIELDS_SYSTEM}, {"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


def read_rows(path: str, n: int) -> list[dict]:
    """The first `n` rows of a run's `iter_<k>/train_rows.jsonl`: a compile's own rows, as it trained them."""
    import json

    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:n]


def count_parameters(model: str) -> int:
    """Parameters of the model, counted on the meta device (no weights loaded: the shape is all it needs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from leap_dspy.lm.models import resolve_model

    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    return sum(p.numel() for p in net.parameters())


def vocab_size(model: str) -> int:
    """The model's vocabulary: the head's matmuls are the ones with this dimension."""
    from transformers import AutoConfig

    from leap_dspy.lm.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model)).vocab_size


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default: TrainConfig's)")
    parser.add_argument("--accumulation", type=int, default=None,
                        help="gradient accumulation steps (default: TrainConfig's)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="TrainConfig.max_batch_tokens, in 16-bit tokens (float32 passes hold half); 0: none; "
                             "default: TrainConfig's")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--targets", default=None, help="comma-separated LoRA target modules")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attn", default=None, help="attention implementation (sdpa, eager)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--turns", type=int, default=None, help="history steps per row (default 0-2; 25 makes "
                                                                  "~1,000-token rows, as long as WebShop's)")
    parser.add_argument("--compile", action="store_true", help="TrainConfig.torch_compile")
    parser.add_argument("--liger", action="store_true", help="TrainConfig.use_liger_kernel (CUDA)")
    parser.add_argument("--rows-file", default=None,
                        help="train on a run's iter_<k>/train_rows.jsonl (its first --rows rows), not made-up rows")
    parser.add_argument("--share-prompt", default="on", choices=["on", "off", "both"],
                        help="TrainConfig.share_prompt; both: train each way in this run and print the ratio")
    parser.add_argument("--fused-lora", default="on", choices=["on", "off", "both"],
                        help="TrainConfig.fused_lora; both: train each way in this run and print the ratio")
    parser.add_argument("--fused-loss", default="on", choices=["on", "off"], help="TrainConfig.fused_loss")
    parser.add_argument("--fused-layers", default="on", choices=["on", "off"], help="TrainConfig.fused_layers")
    parser.add_argument("--method", default="sft", choices=["sft", "dpo", "kto"])
    parser.add_argument("--head-positions", default="completions", choices=["completions", "all", "both"],
                        help="dpo/kto: where TRL's fused LM head runs (all: TRL's own choice on a CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the measured training's time went, by kind of operation")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="train this many steps first, unmeasured (compilation, kernel autotuning)")
    return parser.parse_args(argv)


def _switch(value: str) -> list[bool]:
    return {"on": [True], "off": [False], "both": [False, True]}[value]


def _config(args: argparse.Namespace) -> Any:
    """The `TrainConfig` the command line asks for."""
    from leap_dspy.train import TrainConfig

    overrides = {"dtype": args.dtype, "epochs": args.epochs, "progress_bar": False, "logging_steps": 1,
                 "fused_loss": args.fused_loss == "on", "fused_layers": args.fused_layers == "on"}
    if args.batch:
        overrides["per_device_batch_size"] = args.batch
    if args.accumulation:
        overrides["gradient_accumulation"] = args.accumulation
    if args.max_batch_tokens is not None:
        overrides["max_batch_tokens"] = args.max_batch_tokens or None
    if args.attn:
        overrides["attn_implementation"] = args.attn
    if args.targets:
        overrides["target_modules"] = args.targets.split(",")
    overrides.update(torch_compile=args.compile, use_liger_kernel=args.liger)
    return TrainConfig(**overrides)


def preference_rows(rows: list[dict], method: str) -> list[dict]:
    """The SFT rows as DPO pairs (each answer chosen over the next row's) or KTO rows (every other one
    undesirable, with the next row's answer): the same prompts, so the tokens compare with SFT's."""
    other = rows[1:] + rows[:1]
    if method == "dpo":
        return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": o["completion"]}
                for r, o in zip(rows, other, strict=True)]
    return [{"prompt": r["prompt"], "completion": r["completion"] if i % 2 else o["completion"], "label": bool(i % 2)}
            for i, (r, o) in enumerate(zip(rows, other, strict=True))]


def _train(rows: list[dict], model: str, config: Any, warmup_steps: int, method: str = "sft",
           all_positions: bool = False) -> Any:
    """One measured fine-tune by `method`, after `warmup_steps` unmeasured ones; `all_positions` runs TRL's
    fused head over every position (what TRL does on a CPU by itself)."""
    import leap_dspy.train as train
    import leap_dspy.train.preference as preference

    trainer = getattr(train, f"train_{method}")
    rows = rows if method == "sft" else preference_rows(rows, method)
    scoped = preference._completions_scored_alone
    if all_positions:
        preference._completions_scored_alone = nullcontext
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if warmup_steps:
                warm = config.model_copy(update={"max_steps": warmup_steps})
                n_warm = warmup_steps * config.per_device_batch_size * config.gradient_accumulation
                trainer(rows[:n_warm], model=model, output_dir=os.path.join(tmp, "warmup"), config=warm)
            return trainer(rows, model=model, output_dir=os.path.join(tmp, "adapter"), config=config)
    finally:
        preference._completions_scored_alone = scoped


def _result_lines(result: Any, config: Any, args: argparse.Namespace, n_params: int, best: float,
                  all_positions: bool = False) -> list[tuple[str, str]]:
    """The table's lines for one training run."""
    frac = result.tokens_per_s * 6 * n_params / best
    head = ("" if args.method == "sft" else
            f", {args.method}, head over {'every position' if all_positions else 'the completions'}")
    return [
        ("config", f"batch {config.per_device_batch_size}, LoRA r={config.lora_r} on "
                   f"{','.join(config.target_modules)}, compile {args.compile}, liger {args.liger}, "
                   f"shared prompt head {config.shares_prompt}, fused LoRA {config.fused_lora}, "
                   f"fused loss {config.fused_loss}, fused layers {config.fused_layers}{head}"),
        ("steps / train tokens", f"{result.steps} / {result.train_tokens:,}"),
        ("train wall", f"{result.wall_s:.1f} s (setup {result.setup_s:.1f} s, {args.warmup_steps} warm-up steps "
                       "before, unmeasured)"),
        (f"{args.method.upper()} train tokens/s", f"{result.tokens_per_s:,.0f}"),
        ("loss first -> last", f"{result.loss_history[0]:.3f} -> {result.loss_history[-1]:.3f}"),
        ("tokens/s x 6 x params / best", f"{frac:.1%}"),
        ("peak RSS", f"{result.peak_rss_mb:,.0f} MB"),
    ]


def _runs(args: argparse.Namespace, rows: list[dict], model: str, n_params: int, best: float
          ) -> tuple[list[tuple[str, str]], list[str]]:
    """Each asked-for combination of the switches, trained once: its table lines, then the ratios between them,
    and the operation profiles where asked."""
    table: list[tuple[str, str]] = []
    rates, profiles = {}, []
    vocab = vocab_size(model) if args.profile else None
    shares, fuseds = _switch(args.share_prompt), _switch(args.fused_lora)
    heads = [False] if args.method == "sft" else {"completions": [False], "all": [True], "both": [True, False]}[
        args.head_positions]
    for share, fused, every in itertools.product(shares, fuseds, heads):
        config = _config(args).model_copy(update={"share_prompt": share, "fused_lora": fused})
        with op_profile(config.lora_r, vocab) if args.profile else nullcontext(None) as ops:
            result = _train(rows, model, config, args.warmup_steps, args.method, every)
        rates[share, fused, every] = result.tokens_per_s
        table += _result_lines(result, config, args, n_params, best, every)
        if ops:
            profiles.append(format_profile(ops, f"shared prompt head {config.shares_prompt}, fused LoRA {fused}: "
                                                "by operation"))
    h = heads[-1]
    for name, pairs in (("shared head / plain", [((True, f, h), (False, f, h)) for f in fuseds]),
                        ("fused LoRA / PEFT's", [((s, True, h), (s, False, h)) for s in shares]),
                        ("head over completions / all", [((s, f, False), (s, f, True)) for s in shares
                                                          for f in fuseds])):
        table += [(name, f"{rates[a] / rates[b]:.2f}x tokens/s") for a, b in pairs if a in rates and b in rates]
    return table, profiles


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    import torch

    from leap_dspy.lm.models import DEFAULT_MODEL, load_tokenizer, pick_dtype
    from leap_dspy.train.data import encode_prompt_completion

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or DEFAULT_MODEL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes, repeats = ((4096, 8192), 10) if device == "cuda" else ((2048, 4096), 3)
    f32, n32 = best_matmul_flops("float32", sizes, repeats=repeats, device=device)
    bf16, n16 = (best_matmul_flops("bfloat16", sizes, repeats=repeats, device=device)
                 if "bfloat16" in peak_dtypes(device) else (0.0, 0))
    best = max(f32, bf16)

    rows = read_rows(args.rows_file, args.rows) if args.rows_file else agent_rows(args.rows, turns=args.turns)
    tok = load_tokenizer(model)
    lengths = [encode_prompt_completion(tok, r["prompt"], r["completion"]) for r in rows]
    p_mean = sum(len(p) for p, _ in lengths) / len(lengths)
    c_mean = sum(len(c) for _, c in lengths) / len(lengths)

    rows_line = f"{len(rows)} (prompt {p_mean:.0f} tok, completion {c_mean:.0f} tok on average)"
    n_params = count_parameters(model)
    table = [
        ("device", f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}, attention {args.attn or 'TrainConfig default'}"),
        ("best matmul float32", f"{f32 / 1e9:,.0f} GFLOP/s ({n32}^2)"),
        ("best matmul bfloat16", f"{bf16 / 1e9:,.0f} GFLOP/s ({n16}^2)" if n16 else "not measured: no bf16 units"),
        ("model", f"{model}, {n_params / 1e6:.1f}M params, dtype {pick_dtype(args.dtype)}"),
        ("rows", rows_line),
    ]
    runs, profiles = _runs(args, rows, model, n_params, best)
    table += runs
    width = max(len(k) for k, _ in table)
    print()
    for key, value in table:
        print(f"{key:<{width}}  {value}")
    for profile in profiles:
        print(f"\n{profile}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
