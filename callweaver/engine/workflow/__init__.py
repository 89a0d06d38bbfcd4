"""Call-flow workflows: the model (`model`), the web app's export format (`parse`), checks (`validate`),
logical conditions and typed variables (`conditions`) and one caller turn through the flow (`turn`)."""

from .conditions import coerce_variable, conditions_hold
from .model import (MAX_PROMPT_CHARS, SNAPSHOT_VERSION, Edge, LogicalCondition, Node, VariableSpec, Workflow,
                    WorkflowError)
from .turn import (PRESS_KEYS_TOOL, RECORD_VARIABLES_TOOL, TRANSITION_TOOL, ConversationState, TurnOutcome, TurnPlan,
                   apply_turn, detect_termination, plan_turn, termination_outcome)

__all__ = [
    "ConversationState",
    "Edge",
    "LogicalCondition",
    "MAX_PROMPT_CHARS",
    "Node",
    "PRESS_KEYS_TOOL",
    "RECORD_VARIABLES_TOOL",
    "SNAPSHOT_VERSION",
    "TRANSITION_TOOL",
    "TurnOutcome",
    "TurnPlan",
    "VariableSpec",
    "Workflow",
    "WorkflowError",
    "apply_turn",
    "coerce_variable",
    "conditions_hold",
    "detect_termination",
    "plan_turn",
    "termination_outcome",
]
