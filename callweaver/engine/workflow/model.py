"""The call flow as the engine sees it: steps, the moves between them and the values a call records.

Nothing here knows the web app's export format (that is `parse`); a Workflow is immutable once built.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .conditions import first_true_logical_edge

SNAPSHOT_VERSION = 1
DEFAULT_LANGUAGE = "en-US"
MAX_SPEECH_HINTS = 50
EDGE_KINDS = ("none", "ai_based", "logical", "combined")
OPERATORS = ("==", "!=", ">", "<", ">=", "<=", "contains", "not_contains")
VARIABLE_TYPES = ("string", "number", "integer", "boolean")
# Variables the web app declares for the platform itself ("system"): never offered to the LLM.
SYSTEM_NODE_ID = "system"
PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_][\w.\-]*)\s*\}\}")
E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")  # ASCII digits only: "\d" would accept full-width ones
UNCONDITIONAL_EDGE_TEXT = "the goal of this step is complete"

# Size limits: far above any real flow (the largest sample has 10 nodes and 1.2 kB per node), low enough that one
# request cannot make every turn of a call carry megabytes of prompt.
MAX_NODES = 200
MAX_EDGES = 1000
MAX_PROMPT_CHARS = 20_000


class WorkflowError(ValueError):
    """A workflow that cannot be run; `problems` lists every reason, each precise enough to fix."""

    def __init__(self, problems: Iterable[str]):
        self.problems: list[str] = list(problems)
        super().__init__("; ".join(self.problems) or "invalid workflow")


@dataclass(frozen=True)
class NodeAudio:
    """A recording played when the call enters a node (our `audioUrl` extension), before the node speaks."""

    url: str
    interruptible: bool | None = None  # None: Twilio's default


@dataclass(frozen=True)
class Node:
    """One step of the call flow; `data` is the web app's node data (without UI keys or secrets) for snapshots."""

    id: str
    type: str
    kind: str  # what the engine does here: start | conversation | end | transfer | audio | tool | other
    label: str
    data: dict
    prompt: str = ""
    instructions: str = ""
    objective: str = ""
    first_message: str | None = None
    end_message: str | None = None
    transfer_message: str | None = None
    destination: str | None = None  # the transfer number, separators removed when that makes it valid E.164
    cacheable_override: bool | None = None  # the flow author's explicit choice, if any
    audio: NodeAudio | None = None  # played on entering the node; validate checks the URL

    @property
    def cacheable(self) -> bool:
        """Whether replies here may be cached: the author's explicit choice, else only for prompts without placeholders."""
        if self.cacheable_override is not None:
            return self.cacheable_override
        return not any(PLACEHOLDER_RE.search(text) for text in self.prompt_texts())

    def prompt_texts(self) -> list[str]:
        return [self.prompt, self.instructions, self.objective]


@dataclass(frozen=True)
class LogicalCondition:
    """`variable operator value`; `combine_with` joins it to the condition before it (the editor's reading)."""

    variable: str
    operator: str
    value: Any
    combine_with: str | None


@dataclass(frozen=True)
class Edge:
    """A possible move between steps and the condition that allows it."""

    id: str
    source: str
    target: str
    kind: str
    is_default: bool
    ai_condition: str | None
    logical_conditions: tuple[LogicalCondition, ...]
    combined_condition: str | None
    description: str | None

    @property
    def unconditional(self) -> bool:
        return self.kind == "none"

    @property
    def decided_by_llm(self) -> bool:
        """Edges offered to the LLM through the `transition` tool (logical ones are decided locally)."""
        return self.kind in ("none", "ai_based", "combined")

    def condition_text(self) -> str:
        """How the edge is described to the LLM."""
        if self.kind == "ai_based" and self.ai_condition:
            return self.ai_condition
        if self.kind == "combined" and self.combined_condition:
            return self.combined_condition
        return UNCONDITIONAL_EDGE_TEXT


@dataclass(frozen=True)
class VariableSpec:
    """A value the LLM may extract from the conversation (`node_id` None: at any step)."""

    name: str
    type: str
    description: str | None
    enum_values: tuple | None
    node_id: str | None


@dataclass(frozen=True)
class LlmOptions:
    """The flow's own LLM settings; None where the flow sets nothing."""

    temperature: float | None = None
    max_tokens: int | None = None
    model: str | None = None


@dataclass(frozen=True)
class CallLimits:
    """The flow's own call limits (config.globalSettings); None where it sets none or a value that is no positive
    number (the server's settings then apply)."""

    max_call_duration_s: int | None = None  # maxCallDuration (minutes), in seconds
    silence_timeout_s: float | None = None  # silenceTimeout (seconds; 0: no silence handling)

    def time_limit_s(self, operator_cap_s: int) -> int:
        """Twilio's TimeLimit: the flow's duration, never above the operator's cap (MAX_CALL_DURATION_S)."""
        return min(self.max_call_duration_s or operator_cap_s, operator_cap_s)

    def silence_s(self, server_default_s: float) -> float:
        """Seconds of caller silence before a re-prompt: the flow's, else SILENCE_TIMEOUT_S (0: never)."""
        return self.silence_timeout_s if self.silence_timeout_s is not None else server_default_s


@dataclass(frozen=True, eq=False)
class Workflow:
    """A parsed call flow (the store keeps it as a snapshot plus its hash). Build it with `from_payload`."""

    name: str
    global_prompt: str
    nodes: Mapping[str, Node]
    edges: tuple[Edge, ...]
    variables: tuple[VariableSpec, ...]
    config: dict  # the export's config without secrets: kept only so a snapshot round-trips
    language: str | None = None  # a make-call body's own `language`, if it had one
    default_language: str = DEFAULT_LANGUAGE
    llm_settings: LlmOptions = LlmOptions()
    limits: CallLimits = CallLimits()
    parse_problems: tuple[str, ...] = ()
    _outgoing: dict[str, list[Edge]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        outgoing: dict[str, list[Edge]] = {}
        for edge in self.edges:
            outgoing.setdefault(edge.source, []).append(edge)
        object.__setattr__(self, "_outgoing", outgoing)

    # ---------------------------------------------------------------- export format (parse) and checks (validate)
    # parse and validate import this module, so they are imported when called.

    @classmethod
    def from_payload(cls, payload: Mapping) -> "Workflow":
        """Build from an export file or a make-call body; never raises for content, only for shape (see `problems`)."""
        from .parse import workflow_from_payload
        return workflow_from_payload(payload)

    @classmethod
    def from_snapshot(cls, snapshot: Mapping) -> "Workflow":
        """Rebuild exactly what `to_snapshot` stored (any worker can then run the call)."""
        from .parse import workflow_from_snapshot
        return workflow_from_snapshot(snapshot)

    def to_snapshot(self) -> dict:
        """JSON-safe canonical form, without secrets; `from_snapshot(s).to_snapshot() == s`. A fresh copy."""
        return copy.deepcopy(self.snapshot)

    @functools.cached_property
    def snapshot(self) -> dict:
        """`to_snapshot()` built once and shared: read it or store it, never change it (a Workflow is immutable)."""
        from .parse import workflow_to_snapshot
        return workflow_to_snapshot(self)

    def problems(self) -> list[str]:
        """Everything that makes the workflow unusable, in a stable order."""
        from .validate import workflow_problems
        return workflow_problems(self)

    def warnings(self) -> list[str]:
        """Non-fatal oddities worth showing to whoever built the flow."""
        from .validate import workflow_warnings
        return workflow_warnings(self)

    def validate(self) -> None:
        """Raise WorkflowError listing every problem, or return quietly."""
        problems = self.problems()
        if problems:
            raise WorkflowError(problems)

    @functools.cached_property
    def speech_hints(self) -> tuple[str, ...]:
        """Names a caller may say — the flow's listed values, such as its doctors — for recognition `hints`."""
        hints: list[str] = []
        for spec in self.variables:
            for value in spec.enum_values or ():
                text = " ".join(str(value).replace(",", " ").split())
                if isinstance(value, str) and text and text not in hints:
                    hints.append(text)
        return tuple(hints[:MAX_SPEECH_HINTS])

    @functools.cached_property
    def version_hash(self) -> str:
        """sha256 of the canonical snapshot: any change to prompts, edges or messages changes it.

        Computed once: a Workflow is immutable, and the cache key of every turn needs it."""
        canonical = json.dumps(self.snapshot, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ---------------------------------------------------------------- navigation

    @property
    def llm_options(self) -> dict:
        """{temperature, max_tokens, model}: the keyword arguments the provider chain takes."""
        return {"temperature": self.llm_settings.temperature, "max_tokens": self.llm_settings.max_tokens,
                "model": self.llm_settings.model}

    @property
    def start_node(self) -> Node:
        for node in self.nodes.values():
            if node.kind == "start":
                return node
        raise WorkflowError(["no startNode"])

    @property
    def greeting(self) -> str | None:
        """The start node's firstMessage: spoken on answer, with no LLM call."""
        starts = [n for n in self.nodes.values() if n.kind == "start"]
        return starts[0].first_message if starts else None

    def outgoing(self, node_id: str) -> list[Edge]:
        return list(self._outgoing.get(node_id, ()))

    def first_end_node(self) -> Node | None:
        return next((n for n in self.nodes.values() if n.kind == "end"), None)

    def entry_node_id(self) -> str:
        """Where the first caller turn is handled: past the start node and any other pass-through."""
        return self.settle(self.start_node.id, {})

    def variables_for(self, node_id: str) -> list[VariableSpec]:
        """Variables the LLM may record at this step: the step's own and the global ones, first declaration wins."""
        seen: set[str] = set()
        specs = []
        for spec in self.variables:
            if spec.node_id in (None, node_id) and spec.name not in seen:
                seen.add(spec.name)
                specs.append(spec)
        return specs

    def node(self, node_id: str) -> Node:
        """The step with this id; an unknown id is a caller bug, so it fails loudly rather than stall the call."""
        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowError([f"unknown node '{node_id}'"])
        return node

    def reachable_from(self, node_id: str) -> set[str]:
        seen = {node_id}
        queue = deque([node_id])
        while queue:
            for edge in self._outgoing.get(queue.popleft(), ()):
                if edge.target in self.nodes and edge.target not in seen:
                    seen.add(edge.target)
                    queue.append(edge.target)
        return seen

    def runnable(self, node: Node) -> bool:
        if node.kind in ("start", "conversation", "end", "transfer"):
            return True
        # An unknown node type is harmless only as a pure pass-through; tools and audio would be silently skipped.
        return node.kind == "other" and self._unconditional_target(node.id) is not None

    def settle(self, node_id: str, variables: Mapping[str, Any]) -> str:
        """Follow pass-through nodes (start/other) until a node that needs the caller; cycles stop where they loop."""
        seen: set[str] = set()
        while node_id not in seen:
            seen.add(node_id)
            node = self.nodes.get(node_id)
            if node is None or node.kind not in ("start", "other"):
                return node_id
            logical = first_true_logical_edge(self._outgoing.get(node_id, ()), variables)
            target = logical.target if logical and logical.target in self.nodes else self._unconditional_target(node_id)
            if target is None:
                return node_id
            node_id = target
        return node_id

    def _unconditional_target(self, node_id: str) -> str | None:
        """The single unconditional way on from a node, when no LLM decision is offered there."""
        outgoing = self._outgoing.get(node_id, ())
        if any(e.kind in ("ai_based", "combined") for e in outgoing):
            return None
        unconditional = [e for e in outgoing if e.unconditional and e.target in self.nodes]
        if len(unconditional) > 1:
            unconditional = [e for e in unconditional if e.is_default]
        return unconditional[0].target if len(unconditional) == 1 else None
