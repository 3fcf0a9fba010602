"""DSPy programs: the student agent and the privileged experts that correct it."""

from leap_dspy.programs.experts import MissingPrivilege, OracleExpert, PrivilegedExpert, realizable_reason
from leap_dspy.programs.student import Student, run_episode

__all__ = ["MissingPrivilege", "OracleExpert", "PrivilegedExpert", "Student", "realizable_reason", "run_episode"]
