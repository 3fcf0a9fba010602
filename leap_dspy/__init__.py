"""leap-dspy: LLM agents that learn from privileged AI feedback (LEAP), as DSPy programs.

`LEAP` is the teleprompter; `leap_dspy.signatures`, `leap_dspy.programs` and `leap_dspy.envs` hold the
signatures, the student and expert modules, and the environments; `leap_dspy.lm` the local language models.
"""

from __future__ import annotations

import os
from typing import Any

# LiteLLM and DSPy fetch a model price list from GitHub when first used, retrying for seconds where there is no
# network; the copy each ships serves (set it to false to let them fetch).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"

__all__ = ["LEAP", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import leap_dspy` stays cheap for the CLI and for environment-only users.
    if name == "LEAP":
        from leap_dspy.teleprompt import LEAP

        return LEAP
    raise AttributeError(f"module 'leap_dspy' has no attribute {name!r}")
