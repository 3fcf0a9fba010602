"""The kill table: SIGKILL a small compile at moments spread over every stage, resume it each time, and count
what was lost, duplicated or paid for twice.

    python bench/kill_resume.py [--kills-per-stage 2] [--seed 0] [--beside auto|on|off] [--out /tmp/kill-resume]

Everything is local: keybox (examples/keybox.py) as the environment, a tiny random Llama with SmolLM2's
tokenizer as the student, and the same tiny model behind `leap-dspy serve` as an LM expert asked once per
trajectory over HTTP (the scripted oracle demonstrates, as it would for a real API expert). Two compiles,
behaviour cloning plus one round each: one updated by SFT with that LM expert, one by DPO with the scripted
expert (the tiny model's corrections are all dropped, which would leave DPO no pairs). Each is first run uninterrupted
(the reference), then run again in a fresh folder and killed `--kills-per-stage` times in each stage:
the bench watches the run folder, and when the target stage shows it waits a random moment and SIGKILLs the
process group, then starts the same command again. At the end every JSONL log of the killed run is compared
with the reference's, record key by record key, and the expert server's request count with the reference's
(the resumed runs share one DSPy disk cache, as a user's runs do).

Columns: stage, kills (landed in that stage), missed (the stage passed before the kill landed), resumed (the
next start carried on), records lost and duplicated (in what that stage writes), expert calls paid twice (the
corrections stage; beside it, the calls in flight when a kill landed: paid for and never received, so no cache
can answer them again), final metrics equal to the reference's (per compile).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYBOX = {"num_boxes": 3, "num_train": 8, "num_seen": 8, "num_unseen": 8, "max_steps": 10}
FILES = {  # what each stage writes: its logs' records, and files that must survive (one record each)
    "demonstrations": ["iter_0/trajectories.jsonl", "iter_0/corrections.jsonl", "iter_0/train_rows.jsonl"],
    "bc training": ["iter_0/train.json", "iter_0/adapter/adapter_model.safetensors"],
    "bc evaluation": ["iter_0/eval.jsonl", "iter_0/metrics.json"],
    "rollouts": ["iter_1/trajectories.jsonl"],
    "corrections": ["iter_1/corrections.jsonl", "iter_1/train_rows.jsonl"],
    "update": ["iter_1/train.json", "iter_1/adapter/adapter_model.safetensors"],
    "evaluation": ["iter_1/eval.jsonl", "iter_1/metrics.json"],
    "metrics and report": ["metrics.csv", "episodes.csv", "report.html", "student.json"],
}
EXPERTS = {"sft": "lm", "dpo": "oracle", "kto": "oracle"}
"""The SFT compile asks the served tiny model; the preference ones ask the scripted expert, whose corrections
differ from the student's steps, so that there are preference pairs to train on (the tiny model's are dropped)."""
STAGES = ["demonstrations", "bc training", "bc publish", "rollouts", "corrections", "bc evaluation", "update",
          "publish", "evaluation", "metrics and report"]
"""Behaviour cloning's evaluation is owed until round 1's fine-tune: before it, or beside it (then a kill in
the overlap counts as the update's)."""


def stage_of(run: Path) -> str:
    """Which stage a compile of one round is in, read from what its folder holds."""
    if (run / "student.json").exists():
        return "done"
    if (run / "iter_1" / "metrics.json").exists():
        return "metrics and report"
    one, zero = run / "iter_1", run / "iter_0"
    for path, stage in ((one / "eval.jsonl", "evaluation"), (one / "adapter", "publish"),
                        (one / "adapter.tmp", "update"), (zero / "eval.jsonl", "bc evaluation"),
                        (one / "corrections.jsonl", "corrections"), (one / "trajectories.jsonl", "rollouts"),
                        (zero / "adapter", "bc publish"), (zero / "adapter.tmp", "bc training")):
        if path.exists():
            return stage
    return "demonstrations"


def keys(path: Path) -> list[str]:
    """Each complete line's record key, as the run's own logs key them; a whole file is one record."""
    if path.suffix != ".jsonl":
        return [path.name] if path.exists() else []
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "messages" in record or "prompt" in record:  # training rows: the row itself is its key
            out.append(json.dumps(record, sort_keys=True))
        elif "task_id" in record:
            out.append(f"{record['iteration']}:{record['task_id']}:{record['step']}")
        else:
            out.append(record["task"]["id"])
    return out


def tiny_model(folder: Path) -> str:
    from leap_dspy.lm.models import build_tiny_model

    return str(build_tiny_model(folder))


def child(args: argparse.Namespace) -> None:
    """One compile, as the killed process runs it."""
    sys.path.insert(0, str(ROOT))
    from examples.keybox import KeyBox
    from leap_dspy import LEAP
    from leap_dspy.programs import OracleExpert, PrivilegedExpert, Student
    from leap_dspy.train import TrainConfig

    env = KeyBox(**KEYBOX, seed=args.seed)
    expert = OracleExpert() if args.expert == "oracle" else PrivilegedExpert(
        f"openai/{args.served}", api_base=args.api_base, api_key=args.api_key, per="trajectory", cache=True,
        max_tokens=24, num_retries=0)
    train = TrainConfig(max_length=512, per_device_batch_size=8, gradient_accumulation=1, progress_bar=False)
    leap = LEAP(env, run_dir=args.run_dir, iterations=1, update=args.update, model=args.model, seed=args.seed,
                demonstrator=OracleExpert(), train_config=train, lm_kwargs={"max_new_tokens": 16}, num_threads=4,
                expert_retries=1, evaluate_base=False, evaluate_expert=False, progress=False,
                evaluate_beside_training={"on": True, "off": False}.get(args.beside))
    leap.compile(Student(), trainset=env.tasks("train"), teacher=expert, valset=env.tasks("seen") + env.tasks("unseen"))


class Bench:
    def __init__(self, out: Path, seed: int, beside: str) -> None:
        from leap_dspy.serve import make_server

        self.out, self.seed, self.beside = out, seed, beside
        self.model = tiny_model(out / "tiny-model")
        self.server, url = make_server(self.model, api_key="bench-key", max_new_tokens=24)
        self.answered, self.in_flight_at_kills = 0, 0
        self._count_answers()
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.api_base = url + "/v1"

    def _count_answers(self) -> None:
        """Count the answers the server has sent, so that a kill can tell the calls still in flight (paid for,
        never received: no cache can answer those again)."""
        from leap_dspy import serve

        original, lock, bench = serve._Handler._chat, threading.Lock(), self

        def chat(handler: object, body: object) -> None:
            original(handler, body)
            with lock:
                bench.answered += 1

        serve._Handler._chat = chat

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        in_flight = self.calls() - self.answered
        os.killpg(proc.pid, signal.SIGKILL)
        self.in_flight_at_kills += in_flight

    def command(self, run: Path, update: str) -> list[str]:
        expert = EXPERTS[update]
        return [sys.executable, __file__, "--child", "--run-dir", str(run), "--update", update, "--model", self.model,
                "--expert", expert,
                "--served", self.server.served_name, "--api-base", self.api_base, "--api-key", "bench-key",
                "--seed", str(self.seed), "--beside", self.beside]

    def start(self, run: Path, update: str, cache: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DSPY_CACHEDIR": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(run.with_suffix(".log"), "ab")  # noqa: SIM115 - the child owns it until it exits
        return subprocess.Popen(self.command(run, update), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def calls(self) -> int:
        return self.server.counts.get("chat.completions", 0)

    def reference(self, update: str) -> tuple[Path, int]:
        run = self.out / f"{update}-reference"
        before = self.calls()
        code = self.start(run, update, self.out / f"{update}-reference-cache").wait()
        if code != 0:
            sys.exit(f"the uninterrupted {update} compile failed ({code}); see {run.with_suffix('.log')}")
        return run, self.calls() - before

    def killed(self, update: str, targets: list[str], rng: random.Random) -> tuple[Path, int, list[dict]]:
        """The same compile, killed in each target stage (in order), restarted after each kill until it ends."""
        run, cache = self.out / f"{update}-killed", self.out / f"{update}-killed-cache"
        before, events, pending = self.calls(), [], list(targets)
        while True:
            proc, landed = self.start(run, update, cache), None
            while pending and landed is None and proc.poll() is None:
                target = pending.pop(0)
                if self.watch(proc, run, target, rng):
                    landed = target
                else:
                    events.append({"stage": target, "landed": False, "code": None})
            code = proc.wait()
            events.append({"stage": landed or "final", "landed": landed is not None, "code": code})
            if landed is None:
                return run, self.calls() - before, events

    def watch(self, proc: subprocess.Popen[bytes], run: Path, target: str, rng: random.Random) -> bool:
        """Kill `proc` a random moment after `target` shows in its folder; False if it passed or never came."""
        while proc.poll() is None:
            now = stage_of(run)
            if now == target:
                time.sleep(rng.uniform(0.0, 0.3))
                if proc.poll() is None and stage_of(run) == target:
                    self.kill(proc)
                    return True
                return False
            if now == "done" or STAGES.index(now) > STAGES.index(target):
                return False
            time.sleep(0.02)
        return False


def compare(reference: Path, killed: Path) -> dict[str, tuple[int, int]]:
    """Per stage, (records lost, records duplicated) against the reference, record key by record key."""
    out = {}
    for stage, files in FILES.items():
        lost = duplicated = 0
        for name in files:
            want, have = Counter(keys(reference / name)), Counter(keys(killed / name))
            lost += sum((want - have).values())
            duplicated += sum((have - want).values())
        out[stage] = (lost, duplicated)
    return out


def same_metrics(reference: Path, killed: Path) -> bool:
    def rows(run: Path) -> list[tuple[str, ...]]:
        import csv

        with (run / "metrics.csv").open() as handle:
            return [(r["iteration"], r["seen_success"], r["unseen_success"], r["train_examples"])
                    for r in csv.DictReader(handle)]

    return (killed / "metrics.csv").exists() and rows(reference) == rows(killed)


def table(results: list[tuple[str, list[dict], dict, str, bool]]) -> str:
    head = ["compile", "stage", "kills", "missed", "resumed", "lost", "duplicated", "paid twice", "metrics equal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for update, events, losses, paid_twice, equal in results:
        for stage in STAGES:
            landed = [i for i, e in enumerate(events) if e["stage"] == stage and e["landed"]]
            missed = sum(e["stage"] == stage and not e["landed"] for e in events)
            after = [next((e["code"] for e in events[i + 1:] if e["code"] is not None), None) for i in landed]
            resumed = sum(code in (0, -signal.SIGKILL) for code in after)
            lost, dup = losses.get(stage, ("-", "-"))
            lines.append(f"| {update} | {stage} | {len(landed)} | {missed} | {resumed} | {lost} | {dup} | "
                         f"{paid_twice if stage == 'corrections' else ''} | {'yes' if equal else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills-per-stage", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kill-resume"))
    ap.add_argument("--updates", nargs="+", default=["sft", "dpo"])
    ap.add_argument("--beside", choices=["auto", "on", "off"], default="auto",
                    help="evaluate behaviour cloning beside round 1's fine-tune (auto: the compile's default here)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--run-dir", "--update", "--model", "--expert", "--served", "--api-base", "--api-key"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    bench, rng, results = Bench(args.out, args.seed, args.beside), random.Random(args.seed), []
    started = time.perf_counter()
    for update in args.updates:
        reference, reference_calls = bench.reference(update)
        targets = [stage for stage in STAGES for _ in range(args.kills_per_stage)]
        bench.in_flight_at_kills = 0
        killed, killed_calls, events = bench.killed(update, targets, rng)
        if events[-1]["code"] != 0:
            sys.exit(f"the killed {update} compile did not finish ({events[-1]['code']}); see {killed}.log")
        paid_twice = f"{max(0, killed_calls - reference_calls)} ({bench.in_flight_at_kills} in flight at a kill)"
        results.append((update, events, compare(reference, killed), paid_twice,
                        same_metrics(reference, killed)))
        print(f"{update}: {sum(e['landed'] for e in events)} kills, expert calls {killed_calls} "
              f"(uninterrupted {reference_calls})", flush=True)
    print(table(results))
    print(f"\n{time.perf_counter() - started:.0f} s in all; runs under {args.out}")


if __name__ == "__main__":
    main()
