"""The settings of `leap-dspy compile` (LEAPConfig's defaults, then a --config file, then what was typed) and what
the commands build from what was typed: the environment, its tasks, the expert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from rich.markup import escape

from leap_dspy.progress import console


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as an error and return the exit to raise: a person gets one line, not a traceback."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # `search[...]` is text, not markup
    return typer.Exit(code)


def parse_sets(values: list[str] | None) -> dict[str, Any]:
    """Environment options from `--set KEY=VALUE`s, each value read as YAML so numbers and lists keep their type."""
    options: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise fail(f"--set takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise fail(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from exc
    return options


def resolve_settings(ctx: typer.Context, given: dict[str, Any], config_file: Path | None, env: str,
                     sets: list[str] | None, expert: str, expert_per: str, demonstrator: str | None = None
                     ) -> tuple[str, dict[str, Any], str, str, str | None, dict[str, Any]]:
    """(env, env options, expert, expert_per, demonstrator, LEAP settings): the defaults, then the --config file
    (a run's config.yaml also gives its environment, expert and demonstrator), then what was typed."""
    params = {"num_threads": "threads", "evaluate_base": "base", "evaluate_expert": "expert_reference",
              "progress": "quiet", "rollout_servers": "rollout_server"}
    explicit = {k: v for k, v in given.items() if _given(ctx, params.get(k, k))}
    settings, run = read_settings(config_file)
    settings = {**given, **settings, **explicit}
    options: dict[str, Any] = {}
    if isinstance(run.get("env"), dict) and (not _given(ctx, "env") or env == run["env"].get("name")):
        # the run's environment, with its options: also where --env names it again (docs/cli.md's seed rerun)
        env = str(run["env"]["name"])
        from leap_dspy.run_config import env_defaults

        defaults = env_defaults(env)  # a recorded None is the user's choice where the default is not None
        options = {k: v for k, v in run["env"].items()
                   if k != "name" and (v is not None or defaults.get(k) is not None)}
    if isinstance(run.get("expert"), dict) and not _given(ctx, "expert"):
        described = run["expert"]
        expert = expert_spec(described)
        if expert is None or "expertise" in described:  # an expert of the user's own, built in Python
            raise fail(f"{config_file} names an expert the command line cannot rebuild ({described}); pass "
                       "--expert, or rerun it from Python")
        expert_per = described.get("per", expert_per)
        demonstrator = demonstrator or _recorded_demonstrator(run, config_file)
    student = run.get("student")
    if isinstance(student, dict) and own_student(student):
        raise fail(f"{config_file} compiled a student of its own ({student.get('name')}); rerun it from Python: "
                   "the command line compiles leap-dspy's Student")
    typed = parse_sets(sets)
    options.update(typed)
    if takes_seed(env) and ("seed" not in options or (_given(ctx, "seed") and "seed" not in typed)):
        options["seed"] = settings["seed"]  # one seed fixes the task lists too
    return env, options, expert or "oracle", expert_per, demonstrator, settings


def _recorded_demonstrator(run: dict[str, Any], config_file: Path | None) -> str | None:
    """The `--demonstrator` a run's config.yaml recorded, where it is not the one its expert implies (the expert
    itself, or the scripted one for a privileged self): a rerun must not swap who demonstrates."""
    described, expert = run.get("demonstrator"), run.get("expert")
    if not isinstance(described, dict) or described == expert:
        return None
    spec = expert_spec(described)
    if spec == "oracle" and expert_spec(expert) == "self":
        return None
    if spec is None or "expertise" in described or spec == "self":
        raise fail(f"{config_file} names a demonstrator the command line cannot rebuild ({described}); pass "
                   "--demonstrator, or rerun it from Python")
    return spec


def read_settings(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LEAPConfig fields, the run's other keys) of a settings file or a run's config.yaml."""
    from leap_dspy.config import LEAPConfig
    from leap_dspy.run_config import as_run_ran, check_schema

    if path is None:
        return {}, {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"cannot read --config {path}: {_yaml_error(exc)}") from exc
    if not isinstance(data, dict):
        raise fail(f"--config {path} is not a mapping of LEAP settings")
    try:
        check_schema(data, f"--config {path}")
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if "schema_version" in data:  # a run's config.yaml: rerun as it ran
        data = as_run_ran(data)
        data = _unpin_derived_lr(data)
    run_keys = {"env", "student", "expert", "demonstrator", "trainset", "valset", "task_digest", "bc_expert_level",
                "schema_version"}
    unknown = sorted(set(data) - set(LEAPConfig.model_fields) - run_keys)
    if unknown:
        raise fail(f"--config {path}: not LEAP settings: {', '.join(unknown)}")
    settings = {k: v for k, v in data.items() if k in LEAPConfig.model_fields}
    try:  # each value here, so that a wrong one names the file it is in
        LEAPConfig.model_validate(settings)
    except ValueError as exc:
        raise fail(f"--config {path}: {first_error(exc)}") from exc
    return settings, {k: v for k, v in data.items() if k in run_keys}


def first_error(exc: Exception) -> str:
    """A pydantic validation error as one line: the field and what is wrong with it."""
    errors = getattr(exc, "errors", lambda: [])()
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def _yaml_error(exc: Exception) -> str:
    """A YAML syntax error as one line, where it is and what was expected (PyYAML's own message quotes it)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _unpin_derived_lr(data: dict[str, Any]) -> dict[str, Any]:
    """A run's config.yaml records the rounds' learning rate it used (`LEAPConfig.dump`), also where it was derived
    (a tenth of SFT's, or DPO/KTO's own): drop it there, so that a rerun with another `--update` or training rate
    derives its own instead of keeping the recorded run's."""
    from leap_dspy.config import LEAPConfig

    fields = {k: v for k, v in data.items() if k in LEAPConfig.model_fields and k != "iteration_lr"}
    try:
        derived = LEAPConfig(**fields).iteration_learning_rate()
    except ValueError:
        return data
    return {k: v for k, v in data.items() if k != "iteration_lr"} if data.get("iteration_lr") == derived else data


def _given(ctx: typer.Context, param: str) -> bool:
    """Whether `param` was typed (by name: typer may carry its own copy of click's ParameterSource)."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def own_student(described: dict[str, Any]) -> bool:
    """Whether a run's config.yaml `student` entry is a student of the user's own, which only Python rebuilds
    (another class, or leap-dspy's Student with another signature)."""
    return described.get("name", "Student") != "Student" or "signature" in described


def expert_spec(described: dict[str, Any]) -> str | None:
    """The `--expert` value that a run's config.yaml `expert` (or `demonstrator`) entry describes."""
    return {"OracleExpert": "oracle", "SelfExpert": "self"}.get(described.get("name"), described.get("model"))


def takes_seed(env: str) -> bool:
    """Whether the environment `env` takes a `seed` option: only then does the run's seed fix its task lists too."""
    import inspect

    from leap_dspy.envs import UnknownEnvironment, env_class

    try:
        return "seed" in inspect.signature(env_class(env)).parameters
    except (UnknownEnvironment, TypeError, ValueError):
        return False


def build_env(name: str, options: dict[str, Any]) -> Any:
    from leap_dspy.envs import UnknownEnvironment, make_env

    try:
        return make_env(name, **options)
    except UnknownEnvironment as exc:
        raise fail(str(exc)) from exc
    except (TypeError, ValueError) as exc:  # an unknown option, or a value the environment refuses
        raise fail(f"bad option for {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    except Exception as exc:  # the environment's own constructor failed: a data file it cannot find, ...
        raise fail(f"cannot build the environment {name}: {type(exc).__name__}: "
                   f"{(str(exc).splitlines() or [''])[0]}") from exc


def env_tasks(environment: Any, split: str) -> list[Any]:
    """`environment.tasks(split)`, where a task list that cannot be made (games that do not generate, a data
    folder without games) is one line, not a traceback, and one shorter than its `num_<split>` option asked
    for (a small catalog, a task file of few lines) is said: the run would otherwise look like the one asked."""
    try:
        found = environment.tasks(split)
    except (OSError, RuntimeError, ValueError) as exc:
        raise fail(f"cannot list the {split} tasks of {environment.name}: "
                   f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from exc
    asked = environment.config().get(f"num_{split}")
    if isinstance(asked, int) and not isinstance(asked, bool) and len(found) < asked:
        console.print(f"[yellow]warning:[/yellow] {escape(environment.name)} has {len(found)} {split} tasks, "
                      f"not the {asked} asked (num_{split}): its data holds no more with these options",
                      soft_wrap=True, highlight=False)
    return found


def compile_tasks(environment: Any) -> tuple[list[Any], list[Any]]:
    """The tasks a compile trains on and evaluates (train; seen, then unseen): one home, so that what a grid
    compares a published run's recorded tasks against is what a compile would run."""
    return env_tasks(environment, "train"), env_tasks(environment, "seen") + env_tasks(environment, "unseen")


def build_demonstrator(spec: str | None, model: str) -> Any:
    """`--demonstrator`: the scripted expert or an LM plays behaviour cloning's demonstrations (None: the expert
    does, or the scripted one where the expert is the privileged self)."""
    if spec is None:
        return None
    if spec == "self":
        raise fail("--demonstrator self: the untrained student has nothing to show; use oracle or an LM")
    return build_expert(spec, model)


def build_expert(spec: str, model: str, per: str = "step") -> Any:
    from leap_dspy.programs import OracleExpert, PrivilegedExpert

    if per not in ("step", "trajectory"):  # whatever the expert: a typo must not pass silently
        raise fail(f"--expert-per is 'step' or 'trajectory', not {per!r}")
    if per == "trajectory" and spec in ("oracle", "self"):
        raise fail(f"--expert-per trajectory is for an LM expert; --expert {spec} corrects each step")
    if spec == "oracle":
        return OracleExpert()
    if spec == "self":
        from leap_dspy.programs import SelfExpert

        return SelfExpert()
    if "/" not in spec:
        raise fail(f"--expert is 'oracle', 'self' or a LiteLLM model string like openai/gpt-4o, not {spec!r}")
    return PrivilegedExpert(spec, per=per)
