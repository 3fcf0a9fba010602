"""The CLI's contract for bad input: a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leap_dspy.cli import app

runner = CliRunner()


def test_unknown_env_exits_2() -> None:
    result = runner.invoke(app, ["tasks", "--env", "nethack"])
    assert result.exit_code == 2
    assert "unknown environment 'nethack'" in result.output


def test_missing_run_folder_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_folder_without_config_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a run folder" in result.output


def test_bad_options_exit_2() -> None:
    assert runner.invoke(app, ["compile", "--iterations", "-1"]).exit_code == 2
    result = runner.invoke(app, ["compile", "--update", "ppo"])
    assert result.exit_code == 2 and "--update must be sft, dpo or kto" in result.output
    result = runner.invoke(app, ["tasks", "--set", "no-equals-sign"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(app, ["tasks", "--set", "no_such_option=3"])
    assert result.exit_code == 2 and "bad option for alfworld" in result.output
    result = runner.invoke(app, ["compile", "--expert", "gpt4"])
    assert result.exit_code == 2 and "LiteLLM model string" in result.output


def test_bad_split_exits_2() -> None:
    result = runner.invoke(app, ["tasks", "--split", "dev"])
    assert result.exit_code == 2


def test_a_scripted_expert_below_the_top_level_without_a_policy_exits_2() -> None:
    result = runner.invoke(app, ["compile", "--env", "intercode-bash", "--privilege-level", "0", "--quiet"])
    assert result.exit_code == 2 and "no policy at privilege level 0" in result.output


def test_compare_puts_runs_side_by_side(tmp_path: Path) -> None:
    import yaml

    from leap_dspy.runs import RunFolder
    from leap_dspy.store import atomic_write_json

    for name, update, bc_from, unseen in (("sft", "sft", None, [0.05, 0.1, 0.2]), ("dpo", "dpo", "x", [0.05, 0.15])):
        run = RunFolder(tmp_path / name)
        run.path.mkdir()
        config = {"env": {"name": "alfworld", "num_train": 2}, "update": update, "privilege_level": 3,
                  "expert": {"name": "OracleExpert"}, "bc_from": bc_from}
        run.config_path.write_text(yaml.safe_dump(config))
        atomic_write_json(run.stage("expert") / "metrics.json", {"iteration": "expert", "unseen_success": 1.0})
        for k, value in enumerate(unseen):
            atomic_write_json(run.stage(k) / "metrics.json", {"iteration": str(k), "unseen_success": value,
                                                              "wall_s": 60.0})
        run.write_metrics_csv()
    result = runner.invoke(app, ["compare", str(tmp_path / "sft"), str(tmp_path / "dpo")], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "│" in line]
    sft, dpo = ([c.strip() for c in line.split("│")[1:-1]] for line in lines[-2:])
    assert sft == ["sft", "sft", "oracle", "3", "1.0", "0.05", "0.1", "0.2", "3.0"]
    assert dpo == ["dpo", "dpo", "oracle", "3", "1.0", "0.05", "0.15", "", "1.0"]  # its BC was another run's
    missing = runner.invoke(app, ["compare", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a run folder" in missing.output


def test_a_run_from_a_newer_schema_is_refused_and_an_unversioned_one_is_read(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from leap_dspy.run_config import SCHEMA_VERSION, read_config
    from leap_dspy.runs import RunFolder
    from leap_dspy.store import atomic_write_json

    run = RunFolder(tmp_path / "future")
    run.path.mkdir()
    run.config_path.write_text(yaml.safe_dump({"schema_version": SCHEMA_VERSION + 1, "env": {"name": KEYBOX}}))
    atomic_write_json(run.stage(0) / "metrics.json", {"iteration": "0", "unseen_success": 0.5})
    run.write_metrics_csv()
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    for args in (["compare", str(run.path)], ["report", str(run.path), "--out", str(tmp_path / "r")],
                 ["compile", "--env", KEYBOX, "--run-dir", str(run.path), "--quiet"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "upgrade leap-dspy" in result.output, (args, result.output)
    run.config_path.write_text(yaml.safe_dump({"env": {"name": KEYBOX}}))  # written before versioning
    assert read_config(run.config_path)["env"] == {"name": KEYBOX}
    (run.stage(0) / "metrics.json").write_text('{"iteration": "0", "unseen_')  # a disk error, a hand edit
    result = runner.invoke(app, ["report", str(run.path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "metrics.json is corrupt" in result.output and "Traceback" not in result.output
    for damage, says in (("[1, 2]", "holds list"), ("{}", "names no stage"),
                         ('{"iteration": "0", "unseen_success": "abc"}', "its unseen_success is 'abc'")):
        (run.stage(0) / "metrics.json").write_text(damage)  # JSON, but not what leap-dspy wrote
        result = runner.invoke(app, ["report", str(run.path), "--out", str(tmp_path / "r")])
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    atomic_write_json(run.stage(0) / "metrics.json", {"iteration": "0", "unseen_success": 0.5})
    (run.path / "metrics.csv").write_bytes(b"\xff\xfe garbage")
    result = runner.invoke(app, ["compare", str(run.path)])
    assert result.exit_code == 2 and "metrics.csv is not a metrics table" in result.output
    run.config_path.write_text(yaml.safe_dump({"env": KEYBOX}))  # the environment's name alone
    for args in (["compare", str(run.path)], ["evaluate", str(run.path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "env is not a mapping" in result.output, (args, result.output)


def test_a_corrupt_adapter_is_named_before_anything_loads_it(tmp_path: Path) -> None:
    import yaml

    from leap_dspy.runs import RunFolder

    run = RunFolder(tmp_path / "run")
    adapter = run.stage(0) / "adapter"
    adapter.mkdir(parents=True)
    run.config_path.write_text(yaml.safe_dump({"schema_version": 1, "model": "smollm2-135m", "env": {"name": KEYBOX}}))
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # a torn write, a disk error
    result = runner.invoke(app, ["serve", str(run.path)])
    assert result.exit_code == 2 and "not a readable adapter" in result.output and "Traceback" not in result.output
    (adapter / "adapter_model.safetensors").unlink()  # deleted: PEFT took the folder for a hub id
    result = runner.invoke(app, ["serve", str(run.path)])
    assert result.exit_code == 2 and "is missing" in result.output and "Traceback" not in result.output
    (run.path / "compiled.json").write_text('{"stage": 7}')  # names a round the folder does not hold
    result = runner.invoke(app, ["serve", str(run.path)])
    assert result.exit_code == 2 and "names stage 7, which" in result.output and "Traceback" not in result.output


KEYBOX = "examples.keybox:KeyBox"
def test_fewer_tasks_than_asked_are_said(tmp_path: Path) -> None:
    """A WebShop catalog too small for the goals asked makes fewer tasks: said, not left to look like the run
    asked for."""
    result = runner.invoke(app, ["tasks", "--env", "webshop", "--set", "num_products=40", "--set", "num_train=500",
                                 "--set", f"cache_dir={tmp_path}", "--json"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "warning: webshop has" in said and "train tasks, not the 500 asked" in said
    listed = [line for line in result.output.splitlines() if line.startswith("{")]
    assert 0 < len(listed) < 500
    quiet = runner.invoke(app, ["tasks", "--env", "webshop", "--set", "num_products=40", "--set", "num_train=5",
                                "--set", f"cache_dir={tmp_path}", "--json"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output


BAD_INPUTS = [  # (arguments, what the one line must say); nothing may be written to the run folder
    (["--set", "num_receptacles=2"], "num_receptacles must be at least 3"),
    (["--set", "seed=abc"], "bad option for alfworld"),
    (["--set", "task_types=[x]"], "unknown task types"),
    (["--env", KEYBOX, "--set", "num_boxes=99"], "num_boxes must be between"),
    (["--env", KEYBOX, "--set", "num_train=0"], "no training tasks"),
    (["--env", KEYBOX, "--model", "/nonexistent/model"], "neither the embedded"),
    (["--env", KEYBOX, "--model", "someone/not-cached"], "not in the local Hugging Face cache"),
    (["--env", KEYBOX, "--bc-from", "/nonexistent"], "holds no finished behaviour cloning"),
    (["--env", KEYBOX, "--privilege-level", "7"], "privilege"),
    (["--env", KEYBOX, "--preference-anchor", "2"], "preference-anchor"),
    (["--env", KEYBOX, "--report-to", "neptune"], "unknown tracker"),
    (["--env", KEYBOX, "--config", "/nonexistent.yaml"], "cannot read --config"),
    (["--env", KEYBOX, "--config", "yaml:model: [tiny-random"], "column 20: expected ',' or ']'"),  # one line
    (["--env", KEYBOX, "--config", "yaml:iterations: two"], "config.yaml: iterations: Input should be a valid"),
    (["--env", KEYBOX, "--config", "yaml:lm: {bogus_key: 1}"], "unknown engine setting lm.bogus_key"),
    (["--env", KEYBOX, "--set", "num_boxes=["], "the value is not valid YAML"),
    (["--env", KEYBOX, "--train-launcher", "torchrn --nproc_per_node 2"], "no program 'torchrn' on PATH"),
    (["--env", KEYBOX, "--config", "yaml:lm: 7"], "lm must be a mapping"),
    (["--env", KEYBOX, "--config", "yaml:lm: {max_new_tokens: 0}"], "lm.max_new_tokens must be a whole number"),
    (["--env", KEYBOX, "--config", "yaml:train: {lora_r: 0}"], "train.lora_r"),
    (["--env", KEYBOX, "--config", "yaml:train: {per_device_batch_size: 0}"], "train.per_device_batch_size"),
    (["--env", KEYBOX, "--config", "yaml:train: {target_modules: []}"], "train.target_modules"),
    (["--env", KEYBOX, "--model", "tiny-random", "--config", "yaml:train: {target_modules: [q_proj, v_prj]}"],
     "train.target_modules v_prj: no such module"),
    # a run's config.yaml keeps its environment's options where --env names it again, a recorded None included
    (["--env", KEYBOX, "--model", "tiny-random", "--config", f"yaml:{{env: {{name: '{KEYBOX}', num_boxes: 99}}}}"],
     "num_boxes must be between"),
    (["--model", "tiny-random", "--config", f"yaml:{{env: {{name: '{KEYBOX}', num_train: null}}}}"], "bad option"),
    (["--env", KEYBOX, "--expert-per", "bogus"], "--expert-per is 'step' or 'trajectory'"),
    (["--env", KEYBOX, "--expert", "self", "--expert-per", "trajectory"], "--expert-per trajectory is for an LM"),
    (["--env", "tests.data_env:NeedsData", "--set", "data=/nonexistent.jsonl"],
     "cannot build the environment tests.data_env:NeedsData: FileNotFoundError: no data file /nonexistent.jsonl"),
    (["--env", "tests.data_env:UnlistedBox"], "cannot list the train tasks of unlisted: no games could be generated"),
    # checked before the environment makes its tasks (minutes of ALFWorld games at the defaults)
    (["--env", "tests.data_env:UnlistedBox", "--bc-from", "/nonexistent"], "holds no finished behaviour cloning"),
    (["--set", "max_steps=0"], "alfworld: max_steps must be at least 1"),
    (["--set", "num_unseen=-1"], "alfworld: num_unseen must be 0 or more"),
    (["--set", "data_dir=/nonexistent"], "alfworld: data_dir /nonexistent is not a folder"),
    (["--set", "notes=false", "--privilege-level", "0"], "no policy at privilege level 0"),
    (["--env", "webshop", "--set", "num_train=-1"], "webshop: num_train must be at least 0"),
    (["--env", "webshop", "--set", "num_products=0"], "webshop: num_products must be at least 1"),
    (["--config", f"yaml:{{schema_version: 1, env: {{name: '{KEYBOX}'}}, expert: {{name: Mine}}}}"], "cannot rebuild"),
    (["--config", f"yaml:{{schema_version: 1, env: {{name: '{KEYBOX}'}}, student: {{name: Mine}}}}"], "of its own"),
]


@pytest.mark.parametrize(("args", "says"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args: list[str], says: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # `examples` is a folder of the repository
    run, config = tmp_path / "run", tmp_path / "config.yaml"
    for arg in args:
        if arg.startswith("yaml:"):  # a --config file's text
            config.write_text(arg.removeprefix("yaml:"))
    args = [str(config) if arg.startswith("yaml:") else arg for arg in args]
    result = runner.invoke(app, ["compile", "--run-dir", str(run), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert not run.exists() or not any(run.iterdir())


def test_a_program_file_naming_foreign_code_or_an_endpoint_is_refused(tmp_path: Path) -> None:
    """DSPy imports whatever engine class a saved program names: an untrusted student.json must not choose."""
    import json

    for lm, says in (({"engine": {"class": "os:system", "state": {}}}, "engine class 'os:system'"),
                     ({"model": "openai/x", "api_base": "http://elsewhere"}, "endpoint (api_base)")):
        path = tmp_path / "student.json"
        path.write_text(json.dumps({"step": {"lm": lm, "demos": []}}))
        result = runner.invoke(app, ["rollout", str(path), "--env", "examples.keybox:KeyBox"])
        assert result.exit_code == 2 and "refusing to load" in result.output and says in result.output


def test_the_documented_defaults_are_the_configs() -> None:
    """docs/cli.md's option table says what LEAPConfig holds."""
    from leap_dspy.config import LEAPConfig

    table = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    documented = dict(re.findall(r"^\| `(--[\w-]+)`[^|]* \| `?([\w.-]+)`? \|", table, flags=re.MULTILINE))
    config = LEAPConfig()
    for option, field in {"--iterations": "iterations", "--update": "update", "--model": "model",
                          "--max-train-rows": "max_train_rows", "--preference-anchor": "preference_anchor",
                          "--threads": "num_threads", "--seed": "seed"}.items():
        assert documented[option] == str(getattr(config, field)), option


def test_dead_rollout_servers_or_a_fine_tune_that_publishes_nothing_stop_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What stops a compile midway and is mended outside it (a server to start, a trainer killed) is said in a
    line, with the cause and how to go on, not as a traceback."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    base = ["compile", "--env", KEYBOX, "--model", "tiny-random", "--quiet", "--set", "num_train=2"]
    result = runner.invoke(app, [*base, "--run-dir", str(tmp_path / "a"), "--rollout-server", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "no server of the pool (http://127.0.0.1:9) answered" in result.output
    assert "run the same command again" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*base, "--run-dir", str(tmp_path / "b"), "--train-launcher", "true"])
    assert result.exit_code == 1 and "exited 0 without publishing an adapter" in result.output
    assert "Traceback" not in result.output


def test_ctrl_c_stops_a_compile_with_a_line_saying_it_resumes(tmp_path: Path) -> None:
    """A real SIGINT to the compile's process (from its environment's first episode): exit 130 and how to go on,
    where it printed nothing at all."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "leap_dspy", "compile", "--env", "tests.data_env:InterruptedBox",
                             "--model", "tiny-random", "--run-dir", str(tmp_path / "run"), "--quiet"],
                            cwd=root, capture_output=True, text=True, timeout=300,
                            # as from a terminal: a shell's background job (CI, nohup) starts with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stdout + result.stderr
    said = " ".join((result.stdout + result.stderr).split())
    assert "run the same command again to resume" in said and "Traceback" not in said
