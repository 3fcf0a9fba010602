"""The CLI's contract for bad input: a clear message and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

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
