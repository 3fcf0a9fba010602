"""Untrusted model output (`bench/fuzz_parsers.py`): random, huge, empty, marker-nested and injected completions
through the student's parser and an LM expert's are each a recorded failure or a parsed step, never a crash."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fuzz_parsers import run  # noqa: E402


def test_fuzzed_completions_never_crash_a_parser() -> None:
    for row in run(cases=400, seed=1):
        assert row["crashes"] == 0, row
        assert row["parsed"] + row["failures recorded"] == row["cases"]
        assert row["parsed"] > 0 and row["failures recorded"] > 0  # both kinds were exercised
