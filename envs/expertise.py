"""What a scripted expert knows about an environment: how to act below the top privilege level, and how to
explain an action from the student's view.

An environment owns this knowledge (`TextEnv.expertise()`); the generic scripted expert (`OracleExpert`) only
asks. The default below is what any environment gets for free from `oracle_action` and `privileged_state`:
it follows the oracle, gives a reason that claims no more than it knows, and flags actions that name what
only the privileged state holds. An environment that can do better overrides the three methods.
"""

from __future__ import annotations

from leap_dspy.realizability import privileged_mentions
from leap_dspy.types import PrivilegedState, StudentInputs


class Expertise:
    """A scripted expert's knowledge of one environment.

    `levels` are the privilege levels below the top at which `act` has a policy of its own; at the top level
    the expert may follow the oracle, whose next action arrives in `PrivilegedState.oracle_action`.
    `state_at_top`: whether `act`/`explain` at the top level also read the privileged sections (captured at
    every visited step, so only asked for when used).
    """

    levels: tuple[int, ...] = ()
    state_at_top: bool = False
    vocabulary: frozenset[str] = frozenset()
    """Words a student knows without being shown them (the action grammar, a language's keywords): never a
    leak, though a privileged fact (a gold command) uses them too."""

    def act(self, inputs: StudentInputs, privileged: PrivilegedState, student_action: str) -> str | None:
        """The expert's action at this state, or None when it has none (a level without a policy).

        The default follows the oracle. An override should choose what the student could have chosen from
        its own inputs where the oracle's choice rests on hidden facts (where to look, which box to open).
        """
        return privileged.oracle_action

    def explain(self, inputs: StudentInputs, privileged: PrivilegedState, action: str,
                student_action: str = "") -> str:
        """A one-sentence reason for `action` that names only what the student could observe (and, where it
        can, why not `student_action`, the step the student took here; "" in demonstrations).

        The default says what is true and no more: it cannot tell why the oracle acts, so it does not pretend
        to. A reason that states the sub-goal the action serves is what a student learns from.
        """
        return f"The next step towards the task is: {action}."

    def unjustified(self, inputs: StudentInputs, privileged: PrivilegedState, action: str) -> str | None:
        """Why `action` is one only the privileged state could justify, or None when the environment cannot tell.

        The default catches an action naming a term of the privileged facts that appears nowhere in the
        student's inputs (a whole fact it restates, such as the gold command it is, is no reason to flag it).
        A term that only the oracle's own action holds may be one it computed from what the student saw (a
        midpoint, a sum), so the reason says which of the two it is.
        """
        leaked = privileged_mentions(action, inputs, privileged, known=self.vocabulary, facts=False)
        if not leaked:
            return None
        sections = privileged.model_copy(update={"oracle_action": None})
        hidden = privileged_mentions(action, inputs, sections, known=self.vocabulary, facts=False)
        if hidden:
            return f"the action names {', '.join(hidden[:3])}, known only from the privileged state"
        return f"the action names {', '.join(leaked[:3])}, which the student was never shown (the oracle chose it)"
