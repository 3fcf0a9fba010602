"""Task lists: generated games (cached on disk, built lazily) or the official ALFWorld games when present."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from leap_dspy.envs.alfworld import generate as gen
from leap_dspy.types import Split, Task

OFFICIAL_SPLITS = {"train": "train", "seen": "valid_seen", "unseen": "valid_unseen"}


class ALFWorldTask(Task):
    """One ALFWorld game. `instruction` is the goal text ("put a clean apple in fridge.")."""

    env: str = "alfworld"
    game_file: str
    task_type: str
    floor_plan: str = ""
    pddl_params: dict[str, Any] = {}
    expert_plan_length: int | None = None
    expert_seed: int = 0


_CACHE: dict[str, list[ALFWorldTask]] = {}
_CACHE_LOCK = threading.Lock()


def _specs(cfg: dict[str, Any], split: Split, count: int) -> list[dict[str, Any]]:
    train_fps, unseen_fps = gen.split_floor_plans(cfg["seed"])
    fps = unseen_fps if split == "unseen" else train_fps
    types = list(cfg["task_types"])
    specs = []
    for i in range(count):
        task_type = types[i % len(types)]
        k = i // len(types)
        candidates = [f for f in fps if gen.feasible(f, task_type)]
        if not candidates:
            raise ValueError(f"alfworld: no floor plan in the {split} pool supports {task_type}")
        # train and seen draw from the same floor plans; keys (and so games) differ by split
        key = gen.game_key(
            seed=cfg["seed"],
            split=split,
            task_type=task_type,
            k=k,
            num_receptacles=cfg["num_receptacles"],
            max_steps=cfg["max_steps"],
        )
        specs.append(
            {
                "key": key,
                "task_type": task_type,
                "floor_plans": candidates,
                "index": i,
                "num_receptacles": cfg["num_receptacles"],
                "max_steps": cfg["max_steps"],
                "seed": cfg["seed"],
            }
        )
    return specs


def _run_specs(specs: list[dict[str, Any]], root: Path, desc: str, workers: int = 2) -> dict[str, dict]:
    """Generate the missing games, in `workers` subprocesses when there are several, with a progress bar.

    Workers are plain `python -m leap_dspy.envs.alfworld.generate` processes (never forks of a process that
    may run threads, and no re-import of the caller's __main__).
    """
    from tqdm.auto import tqdm

    missing = [s for s in specs if not (root / s["key"] / "meta.json").exists()]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(missing), desc=desc, unit="game")
        try:
            if workers > 1 and len(missing) > 3:
                _run_workers(missing, root, workers, bar)
            else:
                for spec in missing:
                    gen.generate_game(spec, str(root))
                    bar.update(1)
        finally:
            bar.close()
    return {s["key"]: json.loads((root / s["key"] / "meta.json").read_text()) for s in specs}


def _run_workers(missing: list[dict[str, Any]], root: Path, workers: int, bar: Any) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=root, delete=False) as fh:
        json.dump(missing, fh)
        spec_file = fh.name
    module = "leap_dspy.envs.alfworld.generate"
    with contextlib.ExitStack() as stack:
        stack.callback(os.unlink, spec_file)
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(workers)]
        procs = []
        for i in range(workers):
            cmd = [sys.executable, "-m", module, spec_file, str(root), str(i), str(workers)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[i]))
            stack.callback(lambda p=procs[-1]: p.poll() is None and p.kill())
        seen = 0
        while True:
            running = [p for p in procs if p.poll() is None]
            now = sum((root / s["key"] / "meta.json").exists() for s in missing)
            bar.update(now - seen)
            seen = now
            if not running:
                break
            time.sleep(0.5)
        for i, proc in enumerate(procs):
            if proc.returncode != 0:
                logs[i].seek(0)
                tail = logs[i].read().decode(errors="replace")[-2000:]
                why = [line for line in tail.splitlines() if line.startswith("RuntimeError: no ")]
                if why:  # the generator's own reason, in one line
                    raise RuntimeError(f"alfworld: {why[-1].removeprefix('RuntimeError: ')}")
                raise RuntimeError(
                    f"alfworld game generation worker {i} failed (rc={proc.returncode}):\n{tail}"
                )


def generated_tasks(cfg: dict[str, Any], split: Split, cache_root: Path) -> list[ALFWorldTask]:
    count = {"train": cfg["num_train"], "seen": cfg["num_seen"], "unseen": cfg["num_unseen"]}[split]
    specs = _specs(cfg, split, int(count or 0))
    root = cache_root / f"v{gen.GENERATOR_VERSION}"
    metas = _run_specs(specs, root, desc=f"alfworld {split} games")
    tasks = []
    for spec in specs:
        meta = metas[spec["key"]]
        tasks.append(
            ALFWorldTask(
                id=f"alfworld-{split}-{spec['index']:04d}-{spec['key'][:8]}",
                split=split,
                instruction=meta["instruction"],
                game_file=str(root / spec["key"] / "game.tw-pddl"),
                task_type=meta["task_type"],
                floor_plan=meta["floor_plan"],
                pddl_params=meta["pddl_params"],
                expert_plan_length=len(meta["expert_plan"]),
                expert_seed=meta["expert_seed"],
            )
        )
    return tasks


def official_tasks(cfg: dict[str, Any], split: Split, data_root: Path) -> list[ALFWorldTask]:
    base = data_root / "json_2.1.1" / OFFICIAL_SPLITS[split]
    files = sorted(base.glob("**/game.tw-pddl")) if base.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"alfworld: ALFWORLD_DATA/data_dir is set to {data_root}, but no games were found under {base} "
            f"(expected json_2.1.1/{{train,valid_seen,valid_unseen}}/**/game.tw-pddl with traj_data.json "
            f"next to each, as `alfworld-download` lays them out). Unset it to use the generated games."
        )
    tasks = []
    for path in files:
        if "movable" in str(path) or "Sliced" in str(path):
            continue
        traj_path = path.parent / "traj_data.json"
        if not traj_path.exists():
            continue
        traj = json.loads(traj_path.read_text())
        if traj.get("task_type") not in cfg["task_types"]:
            continue
        data = json.loads(path.read_text())
        if data.get("solvable") is False:
            continue
        match = re.search(r"Your task is to: ([^\"]*?)\.?\"", data.get("grammar", ""))
        instruction = (match.group(1).strip() + ".") if match else traj["task_type"].replace("_", " ")
        rel = path.parent.relative_to(base)
        tasks.append(
            ALFWorldTask(
                id=f"alfworld-{split}-{str(rel).replace('/', '__')}",
                split=split,
                instruction=instruction,
                game_file=str(path),
                task_type=traj["task_type"],
                floor_plan=str(traj.get("scene", {}).get("floor_plan", rel.parts[0] if rel.parts else "")),
                pddl_params=traj.get("pddl_params", {}),
                expert_plan_length=len(data["walkthrough"]) if data.get("walkthrough") else None,
            )
        )
    count = {"train": cfg["num_train"], "seen": cfg["num_seen"], "unseen": cfg["num_unseen"]}[split]
    if count is not None and count < len(tasks):
        random.Random(f"alfworld-official-{cfg['seed']}-{split}").shuffle(tasks)
        tasks = sorted(tasks[:count], key=lambda t: t.id)
    return tasks


def cached_tasks(
    cfg: dict[str, Any], split: Split, cache_root: Path, data_root: Path | None
) -> list[ALFWorldTask]:
    """The split's tasks, built once per configuration per process (clones share them)."""
    key = json.dumps(
        {**cfg, "split": split, "cache_root": str(cache_root), "data_root": str(data_root)},
        sort_keys=True,
        default=str,
    )
    with _CACHE_LOCK:
        if key not in _CACHE:
            if data_root is not None:
                _CACHE[key] = official_tasks(cfg, split, data_root)
            else:
                _CACHE[key] = generated_tasks(cfg, split, cache_root)
        return list(_CACHE[key])
