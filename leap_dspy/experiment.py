"""`leap-dspy experiment`: a declared grid of compiles (environment × seed × setting), run as ordinary run folders.

A grid file is a small YAML file::

    name: keybox-experts
    env: examples.keybox:KeyBox        # or a list, to cross environments
    seeds: [0, 1, 2]
    options: {num_train: 8}            # environment options (--set) of every run
    settings: {iterations: 2}          # LEAPConfig fields of every run
    grid:                              # the product of these lists; `options.X` is an environment option,
      options.realizable: [true, false]  # `expert` the --expert spec, anything else a LEAPConfig field
      update: [sft]

Each run is a `leap-dspy compile` in its own process (its memory is returned when it ends), so a grid is
resumable: finished runs are skipped and an interrupted one resumes from its folder. Runs that would clone
the same behaviour share it (`bc_from`): only settings that shape behaviour cloning tell them apart. A grid
outlives the machine it started on: with `--publish`, a run whose summaries are published with the same
settings and tasks is done, and a run whose behaviour cloning was shared from one of those clones again
(seeded, so the same demonstrations and rows). A run another grid published beside it with the same settings
and tasks is copied, not run again.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from leap_dspy.cli_settings import expert_spec, takes_seed
from leap_dspy.config import LEAPConfig
from leap_dspy.progress import console
from leap_dspy.run_config import OPERATIONAL, env_defaults, read_config, with_new_defaults
from leap_dspy.runs import COMPILED, RunFolder, read_metrics
from leap_dspy.store import RunFileError, atomic_write_json, read_json, yaml_plain

PUBLISHED = ("config.yaml", "metrics.csv", "episodes.csv", "compiled.json", "*/metrics.json", "*/train.json")
"""What `--publish` keeps of a finished run: enough to rebuild its report, nothing heavy (no weights, logs)."""


class Grid(BaseModel):
    """A grid file, validated: a typo in a key is an error before anything runs."""

    model_config = ConfigDict(extra="forbid")
    name: str = "grid"
    env: str | list[str] = "alfworld"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    expert: str = "oracle"
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Grid:
        grid = cls.model_validate(yaml.safe_load(path.read_text()) or {})
        fields = set(LEAPConfig.model_fields) - {"seed", "progress"}
        for key in [*grid.settings, *(k for k in grid.grid if k not in ("env", "expert")
                                      and not k.startswith("options."))]:
            if key in ("seed", "progress"):
                raise ValueError(f"{path}: {key!r} is the grid's own: runs take their seeds from `seeds`, and run "
                                 "without progress bars (each writes its log)")
            if key not in fields:
                raise ValueError(f"{path}: {key!r} is not a LEAPConfig field (one of {', '.join(sorted(fields))})")
        LEAPConfig(**grid.settings)  # the shared settings must be valid on their own
        return grid


@dataclass
class Spec:
    """One run of a grid: how to compile it, and which run's behaviour cloning it can share."""

    name: str
    env: str
    seed: int
    options: dict[str, Any]
    settings: dict[str, Any]
    expert: str
    bc_key: str = ""
    bc_from: str | None = None


def expand(grid: Grid) -> list[Spec]:
    """The grid's runs, seed by seed, each seed's cells in file order: a grid stopped part-way (they span
    sessions) has compared every condition on its first seeds rather than one condition on every seed."""
    axes = {"env": grid.env if isinstance(grid.env, list) else [grid.env], **grid.grid}
    specs: list[Spec] = []
    first_with: dict[str, str] = {}
    for seed in grid.seeds:
        for values in itertools.product(*axes.values()):
            cell = dict(zip(axes, values, strict=True))
            options = {**grid.options, **{k.removeprefix("options."): v for k, v in cell.items()
                                          if k.startswith("options.")}}
            settings = {**grid.settings, **{k: v for k, v in cell.items()
                                            if k not in ("env", "expert") and not k.startswith("options.")}}
            expert = str(cell.get("expert", grid.expert))
            varied = [f"{k.removeprefix('options.')}={v}" for k, v in cell.items() if len(axes[k]) > 1 and k != "env"]
            name = "-".join([_slug(cell["env"]), *map(_slug, varied), f"seed{seed}"])
            spec = Spec(name, cell["env"], seed, options, settings, expert)
            spec.bc_key = _bc_key(spec)
            if spec.bc_key in first_with:
                spec.bc_from = first_with[spec.bc_key]
            else:
                first_with[spec.bc_key] = name
            specs.append(spec)
    return specs


def _bc_key(spec: Spec) -> str:
    """What behaviour cloning depends on: the environment and seed, the settings marked `bc`, the expert (its
    demonstrator), and the privilege level where an LM expert demonstrates at it or a privileged self's
    demonstrations are recorded at it (`bc_expert_level`, which `check_bc_from` compares)."""
    config = LEAPConfig(**spec.settings)
    bc = {k: getattr(config, k) for k in LEAPConfig.bc_keys() if k != "seed"}
    level = config.privilege_level if spec.expert != "oracle" else None
    return json.dumps([spec.env, spec.options, spec.seed, bc, spec.expert, level], sort_keys=True, default=str)


def command(spec: Spec, root: Path) -> list[str]:
    """The `leap-dspy compile` that runs `spec`, its settings in a file beside the run folders (`write_settings`)."""
    settings_file = root / ".grid" / f"{spec.name}.yaml"
    cmd = [sys.executable, "-m", "leap_dspy", "compile", "--env", spec.env, "--expert", spec.expert,
           "--config", str(settings_file), "--seed", str(spec.seed), "--run-dir", str(root / spec.name), "--quiet"]
    cmd += set_args(spec.options)
    return cmd + (["--bc-from", str(root / spec.bc_from)] if spec.bc_from else [])


def set_args(options: dict[str, Any]) -> list[str]:
    """`--set KEY=VALUE` for each option, the value as YAML (what `--set` reads): a float such as 1e-05 keeps its
    type, which JSON's spelling would lose."""
    def value(v: Any) -> str:
        return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).removesuffix("...\n").strip()

    return [item for k, v in options.items() for item in ("--set", f"{k}={value(v)}")]


def compile_options(spec: Spec) -> dict[str, Any]:
    """The environment options `command`'s compile runs with: the grid's, and the run's seed where the
    environment takes one and the grid does not set it (as `resolve_settings` decides)."""
    return {"seed": spec.seed, **spec.options} if takes_seed(spec.env) else dict(spec.options)


def write_settings(spec: Spec, root: Path) -> None:
    path = root / ".grid" / f"{spec.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec.settings, sort_keys=False))


def finished(spec: Spec, root: Path) -> bool:
    """Every round evaluated and the student saved, by the `select` the grid asks for (another one resumes the
    run, which only chooses again)."""
    run, config = root / spec.name, LEAPConfig(**spec.settings)
    return ((run / "student.json").exists() and (run / f"iter_{config.iterations}" / "metrics.json").exists()
            and _chose(run) == config.select)


def _chose(run: Path) -> str:
    """The `select` rule a finished run returned its student by ("last" before compiled.json recorded it)."""
    return read_json(run / COMPILED).get("select") if (run / COMPILED).exists() else "last"


DONE = ("done", "published")
"""Finished here, or finished elsewhere with the same settings and published (`published`)."""


def published(spec: Spec, publish: Path | None) -> bool:
    """Whether `publish` holds this run finished, with the configuration the grid gives it today and the tasks its
    environment lists today (the code is not compared): a run published on a machine since gone is not run again."""
    return publish is not None and _same_run(spec, publish / spec.name, say=True)


def copied(spec: Spec, publish: Path | None) -> bool:
    """Copy in a run that another grid published beside `publish` with this run's settings, if there is one.

    Grids overlap (the defaults are a cell of most of them) and a seed repeats its run exactly, so running
    it again would only spend the hours; `copied_from.txt` says where the copy came from."""
    if publish is None:
        return False
    for config_file in sorted(publish.parent.glob(f"*/{_slug(spec.env)}*-seed{spec.seed}/config.yaml")):
        source = config_file.parent
        if source.parent.resolve() != publish.resolve() and (source / "episodes.csv").exists() \
                and _same_run(spec, source, say=False):  # episodes.csv: a published copy, not a run folder
            target, origin = publish / spec.name, source.relative_to(publish.parent)
            _copy_summaries(source, target)
            (target / "copied_from.txt").write_text(f"{origin}\n")
            console.print(f"{spec.name}: copied from {origin}, run with the same settings")
            return True
    return False


def _same_run(spec: Spec, run: Path, say: bool) -> bool:
    """Whether `run` is `spec` finished: every round evaluated with the settings the grid gives it today, on the
    tasks its environment lists today."""
    config = LEAPConfig(**spec.settings, seed=spec.seed)
    if not _evaluated(run, config.iterations):
        return False
    try:
        ran = read_config(run / "config.yaml")
    except RunFileError:
        return False
    expected = expected_config(spec)
    ran = with_new_defaults(ran, expected)
    differs = [k for k in expected if k not in OPERATIONAL | {"bc_from", "env"} and ran.get(k) != expected[k]]
    env = ran.get("env") or {}
    differs += [f"env.{k}" for k, v in yaml_plain(expected["env"]).items()
                if v is not None and env.get(k) != v]  # None: the environment's own choice (a path, a server)
    if expert_spec(ran.get("expert") or {}) != spec.expert:
        differs.append("expert")
    if not differs and _chose(run) == config.select:
        differs += _other_tasks(spec, ran)  # last: listing the tasks builds the environment
    if differs and say:
        console.print(f"{spec.name}: its published copy ran with other {', '.join(differs)}, so it is pending")
    return _chose(run) == config.select and not differs


def _other_tasks(spec: Spec, ran: dict[str, Any]) -> list[str]:
    """What differs between the tasks `ran` recorded and those the environment lists today: the same options
    can list other tasks after a change to the environment or its data (tasks left out, a new catalog)."""
    today = tasks_today(spec.env, compile_options(spec)) or {}  # unlisted: compared by settings, as warned
    return [k for k in today if ran.get(k) != today[k] and (k in ran or k != "task_digest")]  # older runs: ids


_LISTED: dict[tuple[str, str], dict[str, Any] | None] = {}
LIST_TIMEOUT_S = 1800
"""Listing can generate the tasks (ALFWorld's games) or check them in sandboxes (InterCode-Bash): minutes."""


def tasks_today(env: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The task ids and digest a compile of `env` with these options would record, listed by a
    `leap-dspy tasks` process: an environment's data (a catalog, games) is not kept in the grid's memory. None,
    with a warning once a process, where they cannot be listed: the runs are then compared by their settings
    alone, as before tasks were compared, rather than run again for hours over a listing that failed."""
    key = (env, json.dumps(options, sort_keys=True, default=str))
    if key in _LISTED:
        return _LISTED[key]
    cmd = [sys.executable, "-m", "leap_dspy", "tasks", "--env", env, "--as-recorded", *set_args(options)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=LIST_TIMEOUT_S)
        lines = done.stdout.splitlines() if done.returncode == 0 else []
        found = next((json.loads(line) for line in reversed(lines) if line.startswith("{") and '"task_digest"' in line),
                     None)  # the last such line: an environment may print its own lines around it
        why = "its output holds no task list" if done.returncode == 0 else \
            (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        found, why = None, f"no answer in {LIST_TIMEOUT_S} s"
    except ValueError as exc:  # a line that starts as the list and is not JSON
        found, why = None, str(exc)
    if found is None:
        console.print(f"[yellow]warning:[/yellow] cannot list {env}'s tasks to compare finished runs with "
                      f"({why}): they are compared by their settings alone", soft_wrap=True, highlight=False)
    _LISTED[key] = found
    return found


def _evaluated(run: Path, stage: int) -> bool:
    """Whether a published run evaluated `stage` (its metrics.json, or a row of metrics.csv before those)."""
    if (run / f"iter_{stage}" / "metrics.json").exists():
        return True
    if not (run / "metrics.csv").exists():
        return False
    with (run / "metrics.csv").open() as f:
        return any(row.get("iteration") == str(stage) for row in csv.DictReader(f))


def expected_config(spec: Spec) -> dict[str, Any]:
    """The settings and environment a compile of `spec` records, resolved as `LEAP` resolves them (the
    environment's default privilege level and answer budget)."""
    from leap_dspy.envs import env_class

    data = LEAPConfig(**spec.settings, seed=spec.seed).for_env(env_class(spec.env)).dump()
    data["env"] = {"name": spec.env, **env_defaults(spec.env), **compile_options(spec)}
    return data


def _cloned_here(root: Path, name: str) -> bool:
    """A finished behaviour cloning: its adapter, and its evaluation, which now waits for round 1's fine-tune."""
    stage = root / name / "iter_0"
    return (stage / "adapter" / "adapter_config.json").exists() and (stage / "metrics.json").exists()


def _bc_ready(spec: Spec, root: Path) -> bool:
    return spec.bc_from is None or _cloned_here(root, spec.bc_from)


def reclone(specs: list[Spec], states: dict[str, str], root: Path) -> None:
    """Pending runs whose behaviour-cloning source finished without leaving its adapter here (published from
    another machine) share another finished run's clone of the same, or else clone again: the first of each
    group itself, the rest sharing its clone."""
    here = {s.bc_key: s.name for s in specs if states[s.name] == "done" and _cloned_here(root, s.name)}
    for spec in specs:
        if states[spec.name] != "pending" or spec.bc_from is None or states[spec.bc_from] not in DONE \
                or _bc_ready(spec, root):
            continue
        spec.bc_from = here.get(spec.bc_key)
        here.setdefault(spec.bc_key, spec.name)


def grid_states(grid: Grid, root: Path, publish: Path | None = None,
                specs: list[Spec] | None = None) -> dict[str, str]:
    """Each run's state (done, published, pending, or stale: finished here on tasks the environment no longer
    lists), publishing the ones finished here: a grid stopped part-way is reported on what it reached without
    starting the rest."""
    specs = specs if specs is not None else expand(grid)
    states = {s.name: ("stale" if _stale(s, root) else "done") if finished(s, root)
              else "published" if published(s, publish) or copied(s, publish) else "pending" for s in specs}
    if publish is not None:  # runs finished by an earlier call, perhaps one without --publish
        for name in (name for name, state in states.items() if state == "done"):
            publish_run(root / name, publish / name)
    show(specs, states, root, publish)
    return states


def _stale(spec: Spec, root: Path) -> bool:
    """Whether a run finished here played other tasks than its environment lists today: not done (nor published),
    and not run again in its folder, whose compile would refuse the new tasks."""
    try:
        differs = _other_tasks(spec, read_config(root / spec.name / "config.yaml"))
    except RunFileError:
        return False  # finished() read the same folder: its config is the compile's to judge
    if differs:
        console.print(f"{spec.name}: finished here on other tasks ({', '.join(differs)}) than its environment lists "
                      "today; move its folder away to run it again", soft_wrap=True, highlight=False)
    return bool(differs)


def run_grid(grid: Grid, root: Path, jobs: int = 1, publish: Path | None = None, min_free_gb: float = 10.0
             ) -> dict[str, str]:
    """Run every spec not yet finished, `jobs` at a time while `min_free_gb` of memory is free; returns each
    run's state (done, failed: see its log, or skipped: the run it shares behaviour cloning with failed)."""
    root.mkdir(parents=True, exist_ok=True)
    specs = expand(grid)
    states = grid_states(grid, root, publish, specs)
    reclone(specs, states, root)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    # A grid stopped by SIGTERM (a scheduler, `timeout`, `kill`) stops its compiles too, as Ctrl-C does through the
    # process group, instead of leaving them running in run folders that a rerun would find in use.
    main = threading.current_thread() is threading.main_thread()  # only there may a handler be set
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main else None
    try:
        _run_grid_loop(grid, root, jobs, publish, min_free_gb, specs, states, running)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        for name, (process, _) in running.items():
            if process.poll() is None:
                process.terminate()
                states[name] = "pending"
        for process, _ in running.values():
            process.wait()
        atomic_write_json(root / "grid.json", {"name": grid.name, "states": states})
    return states


def _run_grid_loop(grid: Grid, root: Path, jobs: int, publish: Path | None, min_free_gb: float,
                   specs: list[Spec], states: dict[str, str],
                   running: dict[str, tuple[subprocess.Popen[bytes], float]]) -> None:
    while any(state in ("pending", "running") for state in states.values()):
        for spec in specs:
            if states[spec.name] != "pending" or len(running) >= jobs:
                continue
            if spec.bc_from and states[spec.bc_from] in ("failed", "skipped", "stale"):
                states[spec.name] = "skipped"
            elif _bc_ready(spec, root) and (not running or _free_gb() >= min_free_gb):
                write_settings(spec, root)
                log = (root / f"{spec.name}.log").open("ab")
                running[spec.name] = (subprocess.Popen(command(spec, root), stdout=log, stderr=log,
                                                       env=job_environment(jobs)), time.perf_counter())
                states[spec.name] = "running"
                console.print(f"started {spec.name}" + (f" (behaviour cloning of {spec.bc_from})"
                                                        if spec.bc_from else ""))
        time.sleep(1.0 if running else 0.0)
        for name, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            states[name] = "done" if process.returncode == 0 else "failed"
            console.print(f"{name}: {states[name]} in {(time.perf_counter() - started) / 60:.1f} min"
                          + ("" if process.returncode == 0 else f" (exit {process.returncode}; see {name}.log)"))
            if publish is not None and states[name] == "done":
                publish_run(root / name, publish / name)
            show(specs, states, root, publish)
        atomic_write_json(root / "grid.json", {"name": grid.name, "states": states})


def job_environment(jobs: int) -> dict[str, str]:
    """A run's environment: with several at once, each gets its share of the cores for torch's threads, which
    spin at barriers; two compiles each using every core of a 2-core machine trained about 10x slower than one
    (unless the caller set OMP_NUM_THREADS itself)."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def publish_run(run: Path, target: Path) -> None:
    """Copy a finished run's small outputs (see PUBLISHED) to `target`, where a report can be rebuilt from them."""
    RunFolder(run).write_episodes_csv()
    _copy_summaries(run, target)


def _copy_summaries(run: Path, target: Path) -> None:
    if target.exists():  # a run published before with other settings: none of its stages may stay behind
        shutil.rmtree(target)
    for pattern in PUBLISHED:
        for source in run.glob(pattern):
            destination = target / source.relative_to(run)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def show(specs: list[Spec], states: dict[str, str], root: Path, publish: Path | None = None) -> None:
    """The whole grid at a glance: each run's state, its last finished stage and that stage's unseen result."""
    from rich.table import Table

    table = Table(title=f"grid: {sum(s in DONE for s in states.values())}/{len(specs)} done")
    for column in ("run", "state", "stage", "unseen success", "minutes"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for spec in specs:
        folder = RunFolder(publish / spec.name if states[spec.name] == "published" and publish else root / spec.name)
        stages = [s for s in folder.stages() if s.isdigit()] if folder.path.exists() else []
        stage, success, minutes = "", "", ""
        if stages:
            rows = [read_metrics(folder.path / f"iter_{s}" / "metrics.json") for s in stages]
            stage, success = ("BC" if stages[-1] == "0" else f"round {stages[-1]}"), rows[-1].get("unseen_success")
            own = rows[1:] if spec.bc_from and stages[0] == "0" else rows  # a shared behaviour cloning is its source's
            minutes = f"{sum(float(r.get('wall_s') or 0) for r in own) / 60:.1f}"
        table.add_row(spec.name, states[spec.name], stage, "" if success in ("", None) else f"{success:.2f}", minutes)
    console.print(table)


def _free_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def _slug(value: Any) -> str:
    text = str(value).split(":")[-1].split("/")[-1].lower()
    return "".join(c if c.isalnum() or c in "=._" else "-" for c in text)
