"""A run's configuration, as its config.yaml records it: reading it (whichever schema wrote it) and deciding
whether a folder may go on under a configuration (a resume) or lend its behaviour cloning to another run
(`bc_from`). The files a run leaves behind are `runs.RunFolder`'s.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import yaml

from leap_dspy.config import LEAPConfig
from leap_dspy.progress import console
from leap_dspy.runs import RunFolder, hold
from leap_dspy.store import RunFileError, atomic_write_yaml
from leap_dspy.train.config import TrainConfig

SCHEMA_VERSION = 1
"""The version of what a run folder holds (config.yaml's keys, the logs' records, metrics). Bump it when a
field changes meaning; `read_config` reads every older version it knows and refuses a newer one."""
READABLE_SCHEMAS = {0: "before versioning: the records of version 1 without the version key", 1: "current"}
OPERATIONAL = {"iterations", "select", "num_threads", "expert_threads", "expert_retries", "evaluate_base",
               "evaluate_expert", "evaluate_snapped", "evaluate_beside_training", "episode_processes",
               "memory_budget_gb", "report_to", "rollout_servers", "train_launcher", "ray", "ray_workers",
               "schema_version"}
"""Settings a resumed run may change: they decide how much is run and how fast, or which finished round compile
returns, not what a record holds (and an older schema that `read_config` reads is the current one's records)."""


class ConfigMismatch(RunFileError):
    """The run folder was started with another configuration: resuming would mix two experiments."""


def read_config(path: str | Path) -> dict[str, Any]:
    """A run's config.yaml, checked for its schema version, or a `RunFileError` that says why not."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunFileError(f"{path} cannot be read as a run's configuration: {exc}") from exc
    if not isinstance(data, dict):
        raise RunFileError(f"{path} is not a run's configuration (it holds {type(data).__name__})")
    check_schema(data, path)
    wrong = [k for k in ("env", "lm", "train", "expert", "student") if k in data and not isinstance(data[k], dict)]
    if wrong or ("env" in data and not isinstance(data["env"].get("name"), str)):
        raise RunFileError(f"{path} is not a run's configuration as leap-dspy writes it ("
                           + (f"{wrong[0]} is not a mapping" if wrong else "env has no name") + ")")
    return as_run_ran(data)


def as_run_ran(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config.yaml with the settings added since it was written at the values it ran with, where those
    are not the new defaults (a resume or a rerun must not change how it decodes)."""
    if isinstance(config.get("lm"), dict) and "no_repeat_ngram" in config["lm"]:
        config["lm"].setdefault("ngram_repeats", 1)  # before the setting, an n-gram was never said twice
    return config


def check_schema(config: dict[str, Any], path: str | Path) -> None:
    """A `RunFileError` unless this leap-dspy reads the schema `config` (a run's config.yaml) was written with."""
    version = config.get("schema_version", 0)
    if version not in READABLE_SCHEMAS:
        raise RunFileError(f"{path} was written with run schema {version!r}, and this leap-dspy reads "
                           f"{', '.join(map(str, READABLE_SCHEMAS))}: upgrade leap-dspy to read it")


def with_new_defaults(existing: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """`existing` (an earlier config.yaml) with the settings it predates filled in where `config` leaves them at
    their defaults: a run from before a setting existed ran as that default does, so it still resumes and its
    behaviour cloning can still be adopted."""
    def fill(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        added = {k: v for k, v in new.items() if k not in old and k in defaults and v == defaults[k]}
        return {**old, **added}

    filled = fill(existing, config, {k: f.default for k, f in LEAPConfig.model_fields.items()})
    if "task_digest" in config and "task_digest" not in existing:  # recorded since: ids were all it checked
        filled["task_digest"] = config["task_digest"]
    for key, defaults in (("train", lambda: {k: f.default for k, f in TrainConfig.model_fields.items()}),
                          ("env", lambda: env_defaults(str(config["env"].get("name"))))):
        if isinstance(existing.get(key), dict) and isinstance(config.get(key), dict):
            filled[key] = fill(existing[key], config[key], defaults())
    return filled


def env_defaults(name: str) -> dict[str, Any]:
    """The environment constructor's defaults: an option added since a run started ran as its default."""
    from leap_dspy.envs import UnknownEnvironment, env_class

    try:
        parameters = inspect.signature(env_class(name)).parameters.values()
    except (UnknownEnvironment, ValueError, TypeError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def start_run(run: RunFolder, config: dict[str, Any]) -> None:
    """Write `config` to a new run folder, or resume one started with the same configuration: a resume that
    differed in more than the `OPERATIONAL` settings would mix two experiments."""
    hold(run)
    path = run.config_path
    made = sorted(p.name for p in run.path.glob("*") if p.is_dir() and (p / "metrics.json").exists())
    if made and not path.exists():  # adopting them would mix another configuration's work into this one
        raise RunFileError(f"{run.path} holds finished stages ({', '.join(made)}) but no config.yaml, so what made "
                           "them cannot be told; restore its config.yaml, or use another run folder")
    if path.exists():
        existing = with_new_defaults(read_config(path), config)
        ignored = OPERATIONAL  # a finished run may be extended with more iterations, or run on more threads
        diff = sorted(k for k in set(existing) | set(config)
                      if k not in ignored and existing.get(k) != config.get(k))
        if diff:
            unrecorded = [k for k in diff if k not in existing]
            diff = [_named_difference(k, existing.get(k), config.get(k)) for k in diff]
            why = f"; {', '.join(unrecorded)}: not recorded by the leap-dspy that started it" if unrecorded else ""
            raise ConfigMismatch(f"{run.path} holds a run with a different configuration "
                                 f"({', '.join(diff)}{why}); use another run folder")
        console.print(f"resuming the run in {run.path}")
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(path, config)


def recorded_tasks(train: list[Any], val: list[Any]) -> dict[str, Any]:
    """The task ids and digest a run's config.yaml records of the tasks it trains on and evaluates."""
    return {"trainset": [t.id for t in train], "valset": [t.id for t in val], "task_digest": task_digest(train + val)}


def task_digest(tasks: list[Any]) -> str:
    """What the tasks say, not only their ids: a task file edited between a run and its resume keeps its ids
    (a line's index), and the resumed stages would grade other tasks under the same names. A value that is an
    absolute path is left out: it says where a task's files lie (a cache under the home folder), not what the
    task asks."""
    def said(task: Any) -> dict[str, Any]:
        return {k: v for k, v in task.model_dump().items() if not (isinstance(v, str | Path) and os.path.isabs(v))}

    blob = json.dumps([said(t) for t in tasks], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _named_difference(key: str, ran: Any, now: Any) -> str:
    """`key`, or the entries of it that differ where both are mappings (`env.max_questions`)."""
    if key == "task_digest":
        return "task_digest: the tasks ask something else than when the run started (an edited task file?)"
    if not (isinstance(ran, dict) and isinstance(now, dict)):
        return key
    inner = sorted(k for k in set(ran) | set(now) if ran.get(k) != now.get(k))
    return ", ".join(f"{key}.{k}" for k in inner) or key


def check_bc_finished(bc_from: str | Path) -> RunFolder:
    """The run folder `bc_from`, if it holds a finished behaviour cloning; checkable before any task is made."""
    source = RunFolder(bc_from)
    bc = source.path / "iter_0"
    if not source.config_path.exists() or not (bc / "metrics.json").exists() or not (
            bc / "adapter" / "adapter_config.json").exists():
        raise ConfigMismatch(f"bc_from: {source.path} holds no finished behaviour cloning (iter_0)")
    return source


def check_bc_from(bc_from: str | Path, config: dict[str, Any]) -> RunFolder:
    """The run folder `bc_from`, if it holds a finished behaviour cloning made under the settings that decide one
    in `config` (this run's config.yaml): only then may this run adopt it instead of cloning anew."""
    source = check_bc_finished(bc_from)
    theirs = with_new_defaults(read_config(source.config_path), config)
    keys = ("env", "student", "trainset", "valset", "task_digest", "demonstrator", "bc_expert_level",
            *LEAPConfig.bc_keys())
    keys += ("privilege_level",) if "model" in config["demonstrator"] else ()  # an LM demonstrator reads it
    diff = sorted(k for k in keys if theirs.get(k) != config.get(k))
    if diff:
        raise ConfigMismatch(f"bc_from: {source.path} cloned behaviour under another configuration "
                             f"({', '.join(diff)})")
    return source
