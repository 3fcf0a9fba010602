"""InterCode (Yang et al., 2023) Bash and SQL environments over the real data shipped on PyPI.

- `InterCodeBash`: commands run in a bubblewrap sandbox (sandbox.py) on a fresh copy of the task's file system.
- `InterCodeSQL`: Spider databases in SQLite (default, read-only, authorizer) or MariaDB/MySQL (`backend="mysql"`).
The data is read from the installed `intercode-bench` and `icalfa` packages (data.py).
"""

from __future__ import annotations

from leap_dspy.envs.intercode.bash_env import InterCodeBash
from leap_dspy.envs.intercode.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
from leap_dspy.envs.intercode.sql_env import InterCodeSQL, MySQLUnavailable

__all__ = ["InterCodeBash", "InterCodeSQL", "MySQLUnavailable", "Sandbox", "SandboxLimits", "SandboxUnavailable"]
