"""Environment steps per second for several ways of running the same student on the same ALFWorld tasks:

1. leap-dspy's batched rollouts (one thread per episode, the engine batching their requests in lockstep);
2. one episode at a time (the same engine, batch 1);
3. the peer a DSPy user would reach for: the same program under `dspy.Evaluate(num_threads=8)`, over the
   same local model with one generate per request (no cross-request batching);
4. the native peer: llama.cpp's `llama-server -np N` (continuous batching over N slots, built from the
   llama.cpp vendored in a pinned llama-cpp-python sdist, see `bench/llama_cpp.py`) serving the same
   weights exported to GGUF (f16 by default), under `dspy.Evaluate(num_threads=N)`, one row per N.

The batched run plays `--tasks` episodes at once; the slower ways play fewer (`--sequential-tasks`,
`--peer-tasks`) of the same tasks, so that the benchmark ends in minutes: the rates compared are per
environment step, with the same weights, prompts, generation limit and step limit. Every dspy.Evaluate row
plays each episode once (DSPy's straggler re-submission is turned off, see `no_straggler_resubmission`).

Tokens (prompt + generated) are counted the same way for every row: every LM call in DSPy's history is
re-tokenized with the student's own tokenizer and chat template, whatever each backend reports. "compute" is
tokens x 2 x parameters / s over the best float32/bfloat16 `torch.matmul` rate measured on this CPU (same
thread count) in the same run: the fraction of the machine's dense-matmul limit each row reaches.

Usage: python bench/rollout.py [--tasks 64] [--adapter runs/x/iter_2/adapter] [--max-steps 10]
           [--peer-tasks 16] [--sequential-tasks 4] [--llama-parallel 4 8] [--no-llama-cpp]
           [--llama-outtype f16 bf16] [--llama-ctx-per-slot 4096] [--llama-cache-ram 1024]
           [--llama-timeout 3600] [--threads 2] [--profile] [--no-weight-first] [--draft-tokens 4]
Small smoke run: python bench/rollout.py --tasks 8 --peer-tasks 8 --sequential-tasks 2 --max-steps 4 \
           --llama-parallel 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map fetch when the OpenAI client loads

import dspy  # noqa: E402
from dspy.clients import base_lm  # noqa: E402
from matmul_peak import best_matmul_flops, peak_dtypes  # noqa: E402 - bench/, beside this script
from op_profile import format_profile, op_profile  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from leap_dspy.envs.alfworld import ALFWorld  # noqa: E402
from leap_dspy.lm import DEFAULT_MODEL, kernels, local_lm  # noqa: E402
from leap_dspy.lm.lms import get_engine  # noqa: E402
from leap_dspy.programs import Student  # noqa: E402
from leap_dspy.rollout import rollout  # noqa: E402

MiB = 1024 * 1024


class Episode(dspy.Module):
    """One whole episode as a DSPy program, so that `dspy.Evaluate` can run it."""

    def __init__(self, student: Student, env: ALFWorld, max_steps: int) -> None:
        super().__init__()
        self.student = student
        self.env = env
        self.max_steps = max_steps

    def forward(self, task):  # noqa: ANN001, ANN201 - DSPy program signature
        env = self.env.clone()
        trajectory = self.student.run(env, task, max_steps=self.max_steps)
        return dspy.Prediction(success=trajectory.success, steps=len(trajectory.steps))


@dataclasses.dataclass
class Row:
    """One measured way of running the episodes."""

    name: str
    steps: int
    wall_s: float
    tokens: int
    peak_mib: float | None = None
    memory: str = ""  # how peak_mib was measured

    @property
    def rate(self) -> float:
        return self.steps / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def load_llama_cpp() -> ModuleType:
    """bench/llama_cpp.py by path: a plain `import llama_cpp` could pick up llama-cpp-python's own package."""
    spec = importlib.util.spec_from_file_location("bench_llama_cpp", Path(__file__).with_name("llama_cpp.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _proc_kib(field: str) -> int:
    """A memory line (VmRSS, VmHWM) of this process's /proc status, in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux `clear_refs` 5), so each in-process row measures its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class TokenCounter:
    """Prompt + generated tokens of the LM calls made since `start()`, from DSPy's global history, counted
    with the student's tokenizer and chat template: one method for every backend, so rows compare."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def start(self) -> None:
        base_lm.GLOBAL_HISTORY.clear()

    def count(self) -> tuple[int, int]:
        """(total tokens, calls)."""
        entries = list(base_lm.GLOBAL_HISTORY)
        if len(entries) >= base_lm.MAX_HISTORY_SIZE:
            print(f"warning: DSPy keeps only {base_lm.MAX_HISTORY_SIZE} calls: token counts are low")
        total = 0
        for entry in entries:
            prompt = self.engine.tokenize(self.engine.format_prompt(entry["messages"]))
            total += len(prompt) + len(self.engine.tokenize(_output_text(entry)))
        return total, len(entries)


def _output_text(entry: dict) -> str:
    outputs = entry.get("outputs") or [""]
    first = outputs[0]
    if isinstance(first, dict):
        return first.get("text") or ""
    return str(first)


@contextlib.contextmanager
def no_straggler_resubmission() -> Iterator[None]:
    """Turn off DSPy's straggler re-submission (`ParallelExecutor(timeout=120, straggler_limit=3)`, which
    `dspy.Evaluate` does not expose) while the block runs.

    On a CPU an episode easily takes over 120 s, so Evaluate would play its last episodes a second time and,
    returning with `shutdown(wait=False)`, leave those duplicates running into the next row: their LM calls
    would slow it down and be counted in it. Off, every row plays each episode exactly once.
    """
    from dspy.utils.parallelizer import ParallelExecutor

    original = ParallelExecutor.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.timeout = 0  # `0 < self.timeout` gates the straggler check

    ParallelExecutor.__init__ = init
    try:
        yield
    finally:
        ParallelExecutor.__init__ = original


def evaluate_episodes(student: Student, env: ALFWorld, tasks: list, max_steps: int, threads: int) -> int:
    """The tasks as a devset under `dspy.Evaluate(num_threads=threads)`: environment steps played."""
    program = Episode(student, env, max_steps)
    devset = [dspy.Example(task=t).with_inputs("task") for t in tasks]
    steps, episodes = [0], [0]

    def metric(example, prediction, trace=None):  # noqa: ANN001, ANN201
        steps[0] += prediction.steps
        episodes[0] += 1
        return float(prediction.success)

    with no_straggler_resubmission():
        dspy.Evaluate(devset=devset, metric=metric, num_threads=threads, display_progress=False)(program)
    if episodes[0] < len(devset):
        print(f"warning: only {episodes[0]} of {len(devset)} episodes finished (the others raised)")
    return steps[0]


class Bench:
    """Runs and measures the rows: the same student, ChatAdapter, tasks and step limit for each."""

    def __init__(self, args: argparse.Namespace, env: ALFWorld, tasks: list, counter: TokenCounter) -> None:
        self.args = args
        self.env = env
        self.tasks = tasks
        self.counter = counter
        self.adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
        self.rows: list[Row] = []

    def timed(self, name: str, lm: dspy.LM, run: Callable[[Student], int], in_process: bool = True) -> Row:
        """Run `run(student)` over `lm` and record its steps, wall time, tokens and (in process) peak RSS."""
        student = Student(max_invalid_streak=0)
        student.set_lm(lm)
        rss_before = _proc_kib("VmRSS")
        reset = _reset_peak_rss()
        self.counter.start()
        with dspy.context(adapter=self.adapter):
            start = time.perf_counter()
            steps = run(student)
            wall = time.perf_counter() - start
        tokens, calls = self.counter.count()
        row = Row(name, steps, wall, tokens)
        if in_process and reset:
            row.peak_mib, row.memory = max(0, _proc_kib("VmHWM") - rss_before) / 1024, "proc growth"
        elif in_process:
            row.memory = "n/a"
        print(f"{name}: {steps} steps, {calls} LM calls, {tokens} tokens, {wall:.1f} s")
        self.rows.append(row)
        return row

    def llama_rows(self, max_tokens: int) -> None:
        """One llama-server row per `--llama-outtype` and `--llama-parallel` value; skipped, saying why, when
        llama.cpp fails."""
        llama_cpp = load_llama_cpp()
        try:
            binary = llama_cpp.build_llama_server()
        except (llama_cpp.LlamaCppError, OSError) as error:
            print(f"skipping the llama.cpp rows: {error}")
            return
        for outtype in self.args.llama_outtype:
            try:
                gguf = llama_cpp.export_gguf(DEFAULT_MODEL, self.args.adapter, outtype)
            except (llama_cpp.LlamaCppError, OSError) as error:
                print(f"skipping the llama.cpp {outtype} rows: {error}")
                continue
            for parallel in self.args.llama_parallel:
                self.llama_row(llama_cpp, binary, gguf, outtype, parallel, max_tokens)

    def llama_row(self, llama_cpp: ModuleType, binary: Path, gguf: Path, outtype: str, parallel: int,
                  max_tokens: int) -> None:
        tasks = self.tasks[: self.args.peer_tasks]
        try:
            with llama_cpp.llama_server(gguf, parallel, threads=self.args.threads, binary=binary,
                                        ctx_per_slot=self.args.llama_ctx_per_slot,
                                        cache_ram_mib=self.args.llama_cache_ram) as server:
                # no retries and a long timeout: on a loaded machine a slow answer must be waited for,
                # never silently re-sent (a re-sent prompt is paid twice and counted once)
                lm = dspy.LM(f"openai/{gguf.stem}", api_base=server.url + "/v1", api_key="none",
                             temperature=0.0, max_tokens=max_tokens, cache=False, num_retries=0,
                             timeout=self.args.llama_timeout)
                lm("hi", max_tokens=4)  # warm-up: the OpenAI client import and first connection
                row = self.timed(
                    f"llama.cpp llama-server -np {parallel} ({outtype}) under "
                    f"dspy.Evaluate(num_threads={parallel}), {len(tasks)} episodes", lm,
                    lambda s, n=parallel: evaluate_episodes(s, self.env, tasks, self.args.max_steps, n),
                    in_process=False)
        except llama_cpp.LlamaCppError as error:
            print(f"skipping llama.cpp -np {parallel} ({outtype}): {error}")
            return
        if server.peak_rss_bytes:
            row.peak_mib, row.memory = server.peak_rss_bytes / MiB, "server VmHWM"


def local_rows(bench: Bench, args: argparse.Namespace) -> None:
    """The three in-process rows over leap-dspy's local engine."""
    env, tasks = bench.env, bench.tasks
    batched_lm = local_lm(DEFAULT_MODEL, adapter=args.adapter, max_batch=64, draft_tokens=args.draft_tokens)
    # warm up the model (first calls pay one-off costs); the step limit keeps it short
    bench.timed("warm-up", batched_lm, lambda s: sum(
        len(t.steps) for t in rollout(s, env, tasks[:2], num_threads=2, max_steps=min(args.max_steps, 2))))
    bench.rows.clear()

    def batched(student: Student) -> int:
        trajectories = rollout(student, env, tasks, num_threads=len(tasks), max_steps=args.max_steps)
        return sum(len(t.steps) for t in trajectories)

    engine = get_engine(DEFAULT_MODEL, args.adapter, max_batch=64, draft_tokens=args.draft_tokens)
    stats = engine.stats
    before = dataclasses.replace(stats)
    with op_profile(vocab=engine.hf_model.config.vocab_size) if args.profile else contextlib.nullcontext(None) as ops:
        bench.timed(f"batched rollouts ({len(tasks)} episodes at once)", batched_lm, batched)
    prefill_s, total_s = stats.prefill_seconds - before.prefill_seconds, stats.seconds - before.seconds
    print(f"  its generation: {total_s:.1f} s; prefill {prefill_s:.1f} s for "
          f"{stats.prefill_tokens - before.prefill_tokens} tokens through the model, decoding "
          f"{total_s - prefill_s:.1f} s for {stats.output_tokens - before.output_tokens} tokens")
    if ops:
        print(format_profile(ops, "  batched rollouts, by operation"))
    single_lm = local_lm(DEFAULT_MODEL, adapter=args.adapter, batching=False, draft_tokens=args.draft_tokens)

    def one_at_a_time(student: Student) -> int:
        return sum(len(student.run(env.clone(), t, max_steps=args.max_steps).steps)
                   for t in tasks[: args.sequential_tasks])

    bench.timed(f"one episode at a time ({args.sequential_tasks} episodes)", single_lm, one_at_a_time)
    peer_tasks = tasks[: args.peer_tasks]
    bench.timed(f"dspy.Evaluate(num_threads=8), {len(peer_tasks)} episodes", single_lm,
                lambda s: evaluate_episodes(s, env, peer_tasks, args.max_steps, 8))


def print_table(rows: list[Row], title: str, params: int, flops: float, base_rss_mib: float) -> None:
    """Rates, tokens, ratios to both peers, memory and the fraction of the matmul limit, one line a row."""
    peer = next((r for r in rows if r.name.startswith("dspy.Evaluate")), None)
    llama = max((r for r in rows if r.name.startswith("llama.cpp")), key=lambda r: r.rate, default=None)
    table = Table(title=title, caption=(
        f"tokens: prompt + generated, re-tokenized with the student's tokenizer for every row; compute: "
        f"tokens/s x 2 x {params / 1e6:.1f}M params / {flops / 1e9:.1f} GFLOP/s (best torch.matmul here); "
        "peak MiB: llama.cpp = the server process's VmHWM (weights + KV cache + prompt cache), in-process = "
        f"this process's peak RSS during the row minus its RSS before (the model already loaded: the process "
        f"held {base_rss_mib:.0f} MiB before the first row)"))
    for column in ("method", "env steps", "wall s", "steps/s", "tokens", "tokens/s", "x dspy.Evaluate-local",
                   "x llama.cpp best", "peak MiB", "compute"):
        table.add_column(column, justify="right")
    for row in rows:
        ratios = [f"{row.rate / ref.rate:.2f}x" if ref else "-" for ref in (peer, llama)]
        memory = f"{row.peak_mib:.0f} ({row.memory})" if row.peak_mib is not None else row.memory or "-"
        table.add_row(row.name, str(row.steps), f"{row.wall_s:.1f}", f"{row.rate:.2f}", str(row.tokens),
                      f"{row.tokens_per_s:.0f}", *ratios, memory,
                      f"{row.tokens_per_s * 2 * params / flops:.1%}")
    Console(width=220).print(table)  # wide enough for every column, also when written to a file


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=64, help="episodes played at once (compile's --threads default)")
    parser.add_argument("--peer-tasks", type=int, default=16, help="tasks for the dspy.Evaluate and llama.cpp runs")
    parser.add_argument("--split", default="train")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder (default: the untrained model)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--draft-tokens", type=int, default=4,
                        help="the local engine's drafted tokens checked a step (0: one token a step)")
    parser.add_argument("--weight-first", action=argparse.BooleanOptionalAction, default=True,
                        help="let the local engine run small linears weight-first where that measures faster")
    parser.add_argument("--profile", action="store_true",
                        help="profile the batched row by kind of operation (slows that row down; the profiler "
                             "keeps every call, so on a fast CPU use fewer steps, e.g. --max-steps 3: the "
                             "10-step row outgrew 24 GB on an AMX CPU)")
    parser.add_argument("--sequential-tasks", type=int, default=4, help="tasks for the one-at-a-time run")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                        help="add llama.cpp llama-server rows (built on first use; skipped if the build fails)")
    parser.add_argument("--llama-parallel", type=int, nargs="+", default=[4, 8],
                        help="llama-server slots (-np), one row each, with as many dspy.Evaluate threads")
    parser.add_argument("--llama-outtype", nargs="+", default=["f16"], choices=["f16", "bf16", "f32", "q8_0"],
                        help="GGUF weight types of the exported student, one set of llama-server rows each")
    parser.add_argument("--llama-ctx-per-slot", type=int, default=4096, help="llama-server context per slot")
    parser.add_argument("--llama-cache-ram", type=int, default=1024,
                        help="MiB for llama-server's host prompt cache (its own default is 8192)")
    parser.add_argument("--llama-timeout", type=float, default=3600.0, help="seconds one llama-server call may take")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="CPU threads for llama-server and for the matmul ceiling")
    return parser.parse_args()


def _on_sigterm(signum: int, frame: Any) -> None:
    """Stop any llama-server first (threads waiting on it would hold up unwinding), then exit."""
    module = sys.modules.get("bench_llama_cpp")
    if module is not None:
        module.stop_all_servers()
    sys.exit(128 + signum)


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not args.weight_first:
        kernels.WEIGHT_FIRST_ROWS = 0  # every linear goes back to F.linear
    env = ALFWorld()
    tasks = env.tasks(args.split)[: args.tasks]
    engine = get_engine(DEFAULT_MODEL, args.adapter, max_batch=64, draft_tokens=args.draft_tokens)
    base_rss_mib = _proc_kib("VmRSS") / 1024
    bench = Bench(args, env, tasks, TokenCounter(engine))
    local_rows(bench, args)
    if args.llama_cpp:
        bench.llama_rows(engine.max_new_tokens)
    params = sum(p.numel() for p in engine.hf_model.parameters())
    flops = max(best_matmul_flops(dtype, (256, 512, 1024, 2048), threads=args.threads)[0]
                for dtype in peak_dtypes("cpu"))
    title = (f"ALFWorld rollouts, {DEFAULT_MODEL}, adapter={args.adapter}, max {args.max_steps} steps, "
             f"{args.threads} CPU threads")
    print_table(bench.rows, title, params, flops, base_rss_mib)


if __name__ == "__main__":
    main()
