"""Throughput of the local engine: `python -m leap_dspy.lm.bench [--batches 1 8 32 64] [--dtypes ...]`.

Prompts look like rollout prompts: a shared system turn (DSPy ChatAdapter-style field descriptions and
instructions) and a per-row user turn (an observation and a history), about 300 tokens in all; every row
generates exactly `--new` tokens (eos ignored) so tok/s compare across settings. Batch 1 runs the rows one
after another (the "one request at a time" peer). Each setting is warmed up first; with the prefix cache the
shared system turn is then already stored, as in steady-state rollouts. Prints wall time, generated tok/s,
and process CPU seconds (less sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import random
import time

SYSTEM = (
    "Your input fields are:\n1. `task` (str): the goal of the episode\n2. `observation` (str): what the "
    "environment showed after the last action\n3. `history` (str): the previous actions and observations\n"
    "Your output fields are:\n1. `reason` (str): why the next action helps\n2. `action` (str): one admissible "
    "command\nAll interactions will be structured in the following way, with the appropriate values filled in."
    "\n\n[[ ## task ## ]]\n{task}\n\n[[ ## observation ## ]]\n{observation}\n\n[[ ## history ## ]]\n{history}"
    "\n\n[[ ## reason ## ]]\n{reason}\n\n[[ ## action ## ]]\n{action}\n\n[[ ## completed ## ]]\nIn adhering "
    "to this structure, your objective is: \n        You are a household agent. Read the task and the latest "
    "observation, think about where the objects you need are likely to be, and choose the single next "
    "action that makes progress. Use only admissible commands such as go to, open, close, take, move, heat, "
    "cool, clean, use and examine."
)
WORDS = ["cabinet", "drawer", "countertop", "fridge", "microwave", "sinkbasin", "shelf", "desk", "apple", "mug",
         "plate", "knife", "lamp", "towel", "book", "pencil", "bowl", "kettle", "spoon", "cup", "sponge"]


def make_prompts(engine, n: int, seed: int = 0, user_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        obs = " ".join(rng.choice(WORDS) for _ in range(user_words))
        user = (f"[[ ## task ## ]]\nput a clean {rng.choice(WORDS)} in {rng.choice(WORDS)} {i}\n\n"
                f"[[ ## observation ## ]]\nYou see {obs}.\n\n[[ ## history ## ]]\ngo to {rng.choice(WORDS)}\n\n"
                "Respond with the corresponding output fields, starting with the field `[[ ## reason ## ]]`.")
        prompts.append(engine.format_prompt([{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": user}]))
    return prompts


def run(engine, prompts: list[str], batch: int, new: int) -> tuple[float, float, int]:
    from leap_dspy.lm.gen_types import GenParams

    ids = [engine.tokenize(p) for p in prompts]
    params = GenParams(max_new_tokens=new, ignore_eos=True)
    gen = engine._loaded.generator
    wall, cpu = time.perf_counter(), time.process_time()
    produced = 0
    for start in range(0, len(ids), batch):
        for r in gen.generate(ids[start:start + batch], params, engine.prefix_cache):
            produced += r.output_tokens
    return time.perf_counter() - wall, time.process_time() - cpu, produced


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--prefix", choices=["on", "off", "both"], default="both")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rows1", type=int, default=4, help="rows timed at batch 1")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    args = parser.parse_args()

    from leap_dspy.lm.lms import get_engine
    from leap_dspy.lm.models import DEFAULT_MODEL

    prefix_modes = {"on": [True], "off": [False], "both": [False, True]}[args.prefix]
    print(f"{'dtype':9} {'prefix':6} {'batch':>5} {'rows':>4} {'prompt':>6} {'wall s':>7} {'tok/s':>7} "
          f"{'cpu s':>6}", flush=True)
    for dtype in args.dtypes:
        for prefix in prefix_modes:
            engine = get_engine(args.model or DEFAULT_MODEL, dtype=dtype, prefix_cache=prefix, batching=False)
            engine._loaded.generator.prefill.store.clear()
            for batch in args.batches:
                rows = args.rows1 if batch == 1 else batch
                prompts = make_prompts(engine, rows, seed=batch)
                run(engine, make_prompts(engine, 2, seed=999), 2, 2)  # warm kernels (and the prefix store)
                wall, cpu, produced = run(engine, prompts, batch, args.new)
                plen = sum(len(engine.tokenize(p)) for p in prompts) // rows
                print(f"{dtype:9} {str(prefix):6} {batch:5d} {rows:4d} {plen:6d} {wall:7.2f} "
                      f"{produced / wall:7.1f} {cpu:6.2f}", flush=True)


if __name__ == "__main__":
    main()
