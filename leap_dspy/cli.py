"""`leap-dspy`: compile a student with LEAP, evaluate it, roll out any saved program, compare runs, list tasks."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from leap_dspy.cli_runs import load_program, load_run, play_split, print_metrics, run_lm
from leap_dspy.cli_settings import (
    build_demonstrator,
    build_env,
    build_expert,
    compile_tasks,
    env_tasks,
    fail,
    first_error,
    own_student,
    parse_sets,
    resolve_settings,
)
from leap_dspy.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train small LLM agents that beat their teacher, with privileged AI feedback (LEAP).")

EnvOption = Annotated[str, typer.Option("--env", "-e", help="alfworld, webshop, intercode-bash, intercode-sql, "
                                                            "or your own TextEnv as package.module:Class")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="environment option KEY=VALUE (e.g. num_receptacles=6); repeatable")]
OutOption = Annotated[Path | None, typer.Option(help="also write each episode (a Trajectory) to this JSON lines file")]
ProcessesOption = Annotated[int | None, typer.Option(min=1, help=(
    "processes that play the episodes, each on its share of the cores (unset: 2 on a bf16 CPU of two cores or "
    "more without a GPU, else 1)"))]


def _default(name: str) -> Any:
    from leap_dspy.config import LEAPConfig

    return LEAPConfig.model_fields[name].default


def _help(name: str, extra: str = "") -> str:
    from leap_dspy.config import LEAPConfig

    return (LEAPConfig.model_fields[name].description or "") + extra


@app.command("compile")
def compile_(
    ctx: typer.Context,
    env: EnvOption = "alfworld",
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/<env>-<timestamp>)")] = None,
    iterations: Annotated[int, typer.Option(min=0, help=_help("iterations"))] = _default("iterations"),
    update: Annotated[str, typer.Option(help=_help("update"))] = _default("update"),
    expert: Annotated[str, typer.Option(help="oracle (scripted), self, or a LiteLLM model string")] = "oracle",
    expert_per: Annotated[str, typer.Option(help="an LM expert corrects each 'step' or a whole 'trajectory' "
                                                 "per call")] = "step",
    demonstrator: Annotated[str | None, typer.Option(
        help="who plays behaviour cloning's demonstrations: oracle (scripted) or a LiteLLM model string (default: "
             "the expert; the scripted one where the expert is self)")] = None,
    privilege_level: Annotated[int | None, typer.Option(help=_help("privilege_level"))] = None,
    model: Annotated[str, typer.Option(help=_help("model"))] = _default("model"),
    max_train_rows: Annotated[int, typer.Option(min=1, help=_help("max_train_rows"))] = _default("max_train_rows"),
    iteration_lr: Annotated[float | None, typer.Option(min=0.0, help=_help("iteration_lr"))] = None,
    preference_anchor: Annotated[float, typer.Option(min=0.0, max=0.99, help=_help("preference_anchor"))
                                 ] = _default("preference_anchor"),
    drop_unrealizable: Annotated[bool, typer.Option(help=_help("drop_unrealizable"))] = _default("drop_unrealizable"),
    train_all_new: Annotated[bool, typer.Option(help=_help("train_all_new"))] = _default("train_all_new"),
    select: Annotated[str, typer.Option(help=_help("select"))] = _default("select"),
    evaluate_snapped: Annotated[bool, typer.Option(help=_help("evaluate_snapped"))] = _default("evaluate_snapped"),
    evaluate_beside_training: Annotated[bool | None, typer.Option(help=_help("evaluate_beside_training"))] = None,
    memory_budget_gb: Annotated[float | None, typer.Option(help=_help("memory_budget_gb"))] = None,
    episode_processes: Annotated[int | None, typer.Option(min=1, help=_help("episode_processes"))] = None,
    threads: Annotated[int, typer.Option(min=1, help=_help("num_threads"))] = _default("num_threads"),
    base: Annotated[bool, typer.Option(help=_help("evaluate_base"))] = _default("evaluate_base"),
    expert_reference: Annotated[bool, typer.Option("--expert-reference/--no-expert-reference",
                                                   help=_help("evaluate_expert"))] = _default("evaluate_expert"),
    bc_from: Annotated[Path | None, typer.Option(help=_help("bc_from"))] = None,
    seed: Annotated[int, typer.Option(help=_help("seed"))] = _default("seed"),
    report_to: Annotated[list[str] | None, typer.Option(help=_help("report_to", "; repeatable"))] = None,
    rollout_server: Annotated[list[str] | None, typer.Option(help=_help("rollout_servers", "; repeatable"))] = None,
    train_launcher: Annotated[str | None, typer.Option(help=_help("train_launcher"))] = None,
    ray: Annotated[str | None, typer.Option(help=_help("ray"))] = None,
    sets: SetOption = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="a YAML file of LEAP settings (any "
                                                     "LEAPConfig field; a run's config.yaml works too); options "
                                                     "given on the command line win")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """Behaviour cloning, then LEAP iterations; writes a run folder with metrics.csv and report.html."""
    from leap_dspy.config import LEAPConfig
    from leap_dspy.corrections import NoDemonstrations
    from leap_dspy.envs.check import EnvContractError
    from leap_dspy.lm.pool import PoolError
    from leap_dspy.placement import FineTuneFailed
    from leap_dspy.programs import Student
    from leap_dspy.rollout import ExpertUnavailable, attach_env, exception_chain
    from leap_dspy.store import RunFileError
    from leap_dspy.teleprompt import LEAP
    from leap_dspy.train.common import TargetModulesNotFound

    if update not in ("sft", "dpo", "kto"):
        raise fail(f"--update must be sft, dpo or kto, not {update!r}")
    given = {"iterations": iterations, "update": update, "model": model, "privilege_level": privilege_level,
             "max_train_rows": max_train_rows, "iteration_lr": iteration_lr, "preference_anchor": preference_anchor,
             "drop_unrealizable": drop_unrealizable, "train_all_new": train_all_new, "select": select,
             "evaluate_snapped": evaluate_snapped, "evaluate_beside_training": evaluate_beside_training,
             "memory_budget_gb": memory_budget_gb, "episode_processes": episode_processes,
             "num_threads": threads, "evaluate_base": base,
             "evaluate_expert": expert_reference, "bc_from": bc_from, "seed": seed, "progress": not quiet,
             "report_to": report_to or [], "rollout_servers": rollout_server or [],
             "ray": ray, **({"train_launcher": train_launcher} if train_launcher is not None else {})}
    env, options, expert, expert_per, demonstrator, settings = resolve_settings(
        ctx, given, config_file, env, sets, expert, expert_per, demonstrator)
    _before_tasks(settings)
    environment = build_env(env, options)
    teacher = build_expert(expert, settings["model"], expert_per)
    demonstrates = build_demonstrator(demonstrator, settings["model"])
    try:
        config = LEAPConfig(**settings)
        leap = LEAP(environment, config, run_dir=run_dir, demonstrator=demonstrates)
        leap.check_teacher(attach_env(teacher, environment))
    except ValueError as exc:
        raise fail(str(exc).splitlines()[0] if "validation error" not in str(exc) else first_error(exc)) from exc
    trainset, valset = compile_tasks(environment)
    if not trainset:
        raise fail(f"{env} has no training tasks with these options (num_train?)")
    try:
        leap.compile(Student(), trainset=trainset, teacher=teacher, valset=valset)
    except (RunFileError, OSError, EnvContractError, NoDemonstrations, TargetModulesNotFound) as exc:
        raise fail(str(exc)) from exc
    except ExpertUnavailable as exc:
        raise fail(f"{exc}; everything played and answered so far is kept: once the expert answers, run the "
                   "same command again to resume") from exc
    except KeyboardInterrupt:
        console.print("stopped; everything finished so far is kept: run the same command again to resume")
        raise typer.Exit(130) from None
    except Exception as exc:  # the rollout servers or a launched fine-tune: a line, and how to go on
        stopped = next((e for e in exception_chain(exc) if isinstance(e, PoolError | FineTuneFailed)), None)
        if stopped is None:
            raise
        raise fail(f"{stopped}; everything so far is kept: run the same command again to resume", code=1) from exc
    print_metrics(leap.run)


def _before_tasks(settings: dict[str, Any]) -> None:
    """What a compile refuses or sets before the environment makes its tasks (minutes of ALFWorld's games)."""
    from leap_dspy.run_config import ConfigMismatch, check_bc_finished

    if settings.get("bc_from"):
        try:
            check_bc_finished(settings["bc_from"])
        except ConfigMismatch as exc:
            raise fail(str(exc)) from exc
    if not settings.get("progress", True):  # --quiet: transformers' own bars (loading weights) too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder written by compile")],
    split: Annotated[str, typer.Option(help="train, seen or unseen")] = "unseen",
    threads: Annotated[int, typer.Option(min=1)] = 64,
    limit: Annotated[int | None, typer.Option(min=1, help="only the first N tasks")] = None,
    snap: Annotated[bool, typer.Option(help="run a near miss as the admissible action it misses, as a deployed "
                                            "student does (default: strict, as the compile's success)")] = False,
    episode_processes: ProcessesOption = None,
    out: OutOption = None,
) -> None:
    """Evaluate a compiled student (the run folder's student.json, on the adapter its compile chose) on a split."""
    if not run_dir.exists():
        raise fail(f"run folder {run_dir} does not exist")
    config, environment = load_run(run_dir)
    recorded = dict(config.get("student") or {})
    if own_student(recorded):
        raise fail(f"{run_dir} compiled a student of its own ({recorded.get('name')}); evaluate it from Python "
                   "(Agent(env, MyStudent()) after .load(...)): the CLI can only rebuild leap-dspy's Student")
    from leap_dspy.programs import Student

    # The compile's prompts (its recorded settings) on the compile's weights.
    student = load_program(run_dir / "student.json", lm=run_lm(run_dir), settings=Student.init_args(recorded))
    play_split(student, environment, split, threads, limit, f"{run_dir.name} on {split}", out,
               snap=snap, processes=episode_processes)


@app.command("rollout")
def rollout_(
    program: Annotated[Path, typer.Argument(help="a saved Student program (student.json)")],
    env: EnvOption = "alfworld",
    split: Annotated[str, typer.Option(help="train, seen or unseen")] = "unseen",
    threads: Annotated[int, typer.Option(min=1)] = 64,
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    sets: SetOption = None,
    episode_processes: ProcessesOption = None,
    out: OutOption = None,
) -> None:
    """Run any saved program on a split, as it would act deployed, and print its success."""
    environment = build_env(env, parse_sets(sets))
    student = load_program(program)
    play_split(student, environment, split, threads, limit, f"{program.name} on {env}/{split}", out,
               processes=episode_processes)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders written by compile")],
    split: Annotated[str, typer.Option(help="seen or unseen")] = "unseen",
) -> None:
    """One row per run: what it varied (update, expert, privilege level) and its success after behaviour cloning
    and after each LEAP iteration, with the time the run's own stages took (a run started with --bc-from
    counts only its iterations)."""
    from leap_dspy.runs import RunFolder
    from leap_dspy.store import RunFileError

    if split not in ("seen", "unseen"):
        raise fail(f"--split must be seen or unseen, not {split!r}")
    runs = []
    for run_dir in run_dirs:
        config, _ = load_run(run_dir) if (run_dir / "config.yaml").exists() else (None, None)
        if config is None or not (run_dir / "metrics.csv").exists():
            raise fail(f"{run_dir} is not a run folder with metrics (no config.yaml or metrics.csv)")
        try:
            rows = RunFolder(run_dir).summary_rows()
        except RunFileError as exc:
            raise fail(str(exc)) from exc
        runs.append((run_dir, config, rows))
    width = max((sum(k.isdigit() for k in rows) for _, _, rows in runs), default=0)
    table = Table(title=f"{split} success")
    for column in ["run", "update", "expert", "level", "expert's own", *(
            ["BC"] + [f"iter {k}" for k in range(1, width)]), "minutes"]:
        table.add_column(column, justify="right")
    for run_dir, config, rows in runs:
        own = [k for k in rows if k.isdigit() and (k != "0" or not config.get("bc_from"))]
        minutes = sum(float(rows[k].get("wall_s") or 0) for k in own) / 60
        cells = [rows[str(k)][f"{split}_success"] if str(k) in rows else "" for k in range(width)]
        expert = config.get("expert") or {"name": "?"}  # a config.yaml cut short still shows its metrics
        name = {"OracleExpert": "oracle", "SelfExpert": "self"}.get(expert.get("name"),
                                                                     expert.get("model", expert.get("name", "?")))
        table.add_row(run_dir.name, config.get("update", "?"), name, str(config.get("privilege_level", "?")),
                      rows.get("expert", {}).get(f"{split}_success", ""), *cells, f"{minutes:.1f}")
    console.print(table)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders, or folders holding them (an experiment's root)")],
    out: Annotated[Path, typer.Option(help="where report.md, report.html and the plots go")] = Path("report"),
    title: Annotated[str, typer.Option(help="the page's title")] = "LEAP results",
) -> None:
    """One page over many runs: per environment and condition, each stage's mean with a 95% interval over
    seeds and games, each round's paired gain over behaviour cloning, plots, and what the runs cost."""
    from leap_dspy.report import write_report

    missing = [str(p) for p in runs if not p.exists()]
    if missing:
        raise fail(f"no such folder: {', '.join(missing)}")
    try:
        page = write_report(runs, out, title=title)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    console.print(f"wrote {page} and {page.with_suffix('.html')}")


@app.command()
def experiment(
    grid_file: Annotated[Path, typer.Argument(help="a grid YAML file (see examples/grids/)")],
    root: Annotated[Path | None, typer.Option(help="where the run folders go (default runs/<grid name>)")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="runs at once, each with its share of the cores, while "
                                                  "--min-free-gb of memory is free")] = 1,
    min_free_gb: Annotated[float, typer.Option(min=0, help="free memory a further run needs to start")] = 10.0,
    publish: Annotated[Path | None, typer.Option(help="copy each finished run's small outputs (config, "
                                                      "metrics, episodes) here, e.g. docs/results/<name>")] = None,
    dry_run: Annotated[bool, typer.Option(help="list the runs and their commands, run nothing")] = False,
    run: Annotated[bool, typer.Option("--run/--no-run", help="--no-run: start nothing, only show the grid's "
                                      "state and publish its finished runs")] = True,
) -> None:
    """Run a grid of compiles (environment × seed × settings) as run folders; resumable, sharing behaviour
    cloning between runs that would clone the same; then `leap-dspy report` over the root."""
    from leap_dspy.experiment import DONE, Grid, command, expand, grid_states, run_grid

    try:
        grid = Grid.load(grid_file)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise fail(f"bad grid file {grid_file}: {str(exc).splitlines()[0]}") from exc
    root = root or Path("runs") / grid.name
    if dry_run:
        for spec in expand(grid):
            console.print(f"{spec.name}: leap-dspy {shlex.join(command(spec, root)[3:])}", soft_wrap=True,
                          highlight=False, markup=False)  # a command to paste: quoted for the shell
        return
    if publish is not None:  # the file that produced the published runs travels with them
        publish.mkdir(parents=True, exist_ok=True)
        if not (publish / "grid.yaml").exists() or not (publish / "grid.yaml").samefile(grid_file):
            shutil.copy2(grid_file, publish / "grid.yaml")
    if not run:
        states = grid_states(grid, root, publish)
        console.print(f"{sum(s in DONE for s in states.values())} of {len(states)} runs done; started none")
        return
    states = run_grid(grid, root, jobs=jobs, publish=publish, min_free_gb=min_free_gb)
    bad = [name for name, state in states.items() if state not in DONE]
    if bad:
        raise fail(f"{len(bad)} of {len(states)} runs did not finish: {', '.join(bad)}", code=1)
    console.print(f"all {len(states)} runs done; leap-dspy report {publish or root}")


@app.command()
def tasks(
    env: EnvOption = "alfworld",
    split: Annotated[str, typer.Option(help="train, seen or unseen")] = "train",
    sets: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON task per line")] = False,
    as_recorded: Annotated[bool, typer.Option(
        "--as-recorded", help="instead, the task ids and digest a compile's config.yaml would record (every split), "
                              "as one JSON object")] = False,
) -> None:
    """List (generating if needed) an environment's tasks."""
    if split not in ("train", "seen", "unseen"):
        raise fail(f"--split must be train, seen or unseen, not {split!r}")
    environment = build_env(env, parse_sets(sets))
    if as_recorded:
        from leap_dspy.run_config import recorded_tasks

        typer.echo(json.dumps(recorded_tasks(*compile_tasks(environment))))
        return
    found = env_tasks(environment, split)
    if as_json:
        for task in found:
            typer.echo(task.model_dump_json())
        return
    table = Table(title=f"{env} {split}: {len(found)} tasks")
    table.add_column("id")
    table.add_column("instruction")
    for task in found:
        table.add_row(task.id, task.instruction)
    console.print(table)


@app.command()
def serve(
    target: Annotated[str | None, typer.Argument(
        help="a run folder (serves the adapter its compile returned) or a model: the embedded default, an HF "
             "folder")] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0 picks a free one)")] = 8000,
    adapter: Annotated[Path | None, typer.Option(help="a LoRA adapter folder (by default a run folder's compiled one)")
                       ] = None,
    backend: Annotated[str, typer.Option(help="transformers (built in) or vllm (execs `vllm serve`)")
                       ] = "transformers",
    served_name: Annotated[str | None, typer.Option(
        help="the model name clients ask for (default: the model's label, +<adapter folder>)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LEAP_DSPY_API_KEY", help="the key clients must send "
                                                "(Authorization: Bearer KEY); without one only 127.0.0.1 is "
                                                "served")] = None,
    max_workers: Annotated[int, typer.Option(min=1, help="requests served at once; more get 429")] = 32,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds a connection may stay silent before it is "
                                                         "closed")] = 60.0,
) -> None:
    """Serve a compiled student (or any local model) over an OpenAI-compatible HTTP API."""
    import importlib.util
    import shutil

    from leap_dspy.lm.models import ModelNotFound
    from leap_dspy.serve import make_server
    from leap_dspy.serve_target import resolve_target, vllm_command

    if backend not in ("transformers", "vllm"):
        raise fail(f"--backend must be transformers or vllm, not {backend!r}")
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        raise fail(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        model, adapter_path, engine_kwargs = resolve_target(target, adapter)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
            raise fail("--backend vllm needs vLLM (pip install vllm, on a machine with a GPU); "
                       "or serve with the built-in --backend transformers")
        try:
            command = vllm_command(model, adapter_path, host, port, served_name, api_key=api_key)
        except (OSError, ValueError) as exc:
            raise fail(str(exc)) from exc
        console.print(" ".join(command))
        os.execvp(command[0], command)
    try:
        server, url = make_server(model, adapter_path, host=host, port=port, served_name=served_name,
                                  api_key=api_key, max_workers=max_workers, timeout_s=timeout, **engine_kwargs)
    except (ModelNotFound, OSError, ValueError) as exc:
        raise fail(f"cannot serve {model}{f' + {adapter_path}' if adapter_path else ''}: {exc}") from exc
    key = "KEY" if api_key else "none"
    console.print(f"serving [bold]{server.served_name}[/bold] at {url}/v1 — e.g. "
                  f"dspy.LM(\"openai/{server.served_name}\", api_base=\"{url}/v1\", api_key=\"{key}\"); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:  # pragma: no cover - console script entry
    from leap_dspy.train.common import cap_heaps

    cap_heaps()  # before any thread starts: an evaluation's 64 episode threads would each keep a heap
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
