"""Call-flow workflow model: parse the web app's export, validate it, and step a call through it."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
import unicodedata
from collections import deque
from dataclasses import dataclass, replace as replace_fields
from typing import Any, Iterable, Mapping

__all__ = [
    "ConversationState",
    "Edge",
    "LogicalCondition",
    "Node",
    "RECORD_VARIABLES_TOOL",
    "SNAPSHOT_VERSION",
    "PRESS_KEYS_TOOL",
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

TRANSITION_TOOL = "transition"
RECORD_VARIABLES_TOOL = "record_variables"
MAX_SPEECH_HINTS = 50
PRESS_KEYS_TOOL = "press_keys"   # outbound calls: get through a phone menu (IVR) at the other end
_KEYS = re.compile(r"^[0-9*#w]{1,32}$")
SNAPSHOT_VERSION = 1
DEFAULT_LANGUAGE = "en-US"
DEFAULT_HISTORY_LIMIT = 20

# Node `type` strings the web app (and its older versions) writes, by the kind the engine runs.
_NODE_KINDS: dict[str, str] = {
    "startnode": "start", "start": "start", "startcall": "start",
    "conversationnode": "conversation", "conversation": "conversation", "ainode": "conversation",
    "endcall": "end", "endnode": "end", "end": "end",
    "transfercall": "transfer", "transfer": "transfer", "transfernode": "transfer",
    "playaudio": "audio", "audio": "audio", "audionode": "audio", "playaudionode": "audio",
    "toolnode": "tool", "tool": "tool", "apirequest": "tool", "apirequestnode": "tool",
}
EDGE_KINDS = ("none", "ai_based", "logical", "combined")
OPERATORS = ("==", "!=", ">", "<", ">=", "<=", "contains", "not_contains")
VARIABLE_TYPES = ("string", "number", "integer", "boolean")
_JSON_SCHEMA_TYPES = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean"}
# Variables the web app declares for the platform itself ("system"): never offered to the LLM.
_SYSTEM_NODE_ID = "system"

_PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_][\w.\-]*)\s*\}\}")
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")  # ASCII digits only: "\d" would accept full-width ones
_PHONE_SEPARATORS_RE = re.compile(r"[\s().\-]")
_UNKNOWN_VALUE_TEXT = "(not known yet)"
_UNCONDITIONAL_EDGE_TEXT = "the goal of this step is complete"

_PHONE_CALL_GUIDANCE = (
    "You are speaking on a live phone call and everything you write is read aloud. "
    "Answer in short spoken sentences, without markdown, lists, headings, emoji or links. "
    "Ask one question at a time."
)
_REPLY_FIRST_GUIDANCE = "Always say your reply to the caller first; only then call a tool, and only if it applies."
_TRANSITION_GUIDANCE = "Call `transition` when one of its conditions is clearly met by what the caller said."
_RECORD_GUIDANCE = "Call `record_variables` with any of its details the caller has stated; never guess values."
_KEYPAD_GUIDANCE = ("If a recorded phone menu answers instead of a person, call `press_keys` with the key it asks "
                    "for, and say nothing.")
_CLOSING_GUIDANCE = (
    "When moving to an end or transfer step, do not say goodbye or announce the transfer yourself: "
    "the system speaks the closing line."
)

_APOSTROPHES = "'\u2019\u2018`\u00b4\u02bc\uff07"
_CJK_RANGES = (
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x3FFFF),  # CJK Extensions B..
)
_REJECTED = object()  # coerce_variable's "this value does not fit the declared type"


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


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Node:
    """One step of the call flow; `data` is the web app's node data without UI keys or secrets."""

    id: str
    type: str
    label: str
    data: dict

    @property
    def kind(self) -> str:
        """What the engine does here: start | conversation | end | transfer | audio | tool | other."""
        return _NODE_KINDS.get(self.type.replace("_", "").replace("-", "").lower(), "other")

    @property
    def prompt(self) -> str:
        return _text(self.data.get("prompt"))

    @property
    def first_message(self) -> str | None:
        return _text(self.data.get("firstMessage")) or None

    @property
    def end_message(self) -> str | None:
        # The editor's schema names the field `farewell`; the exports write `endMessage`.
        return _text(self.data.get("endMessage")) or _text(self.data.get("farewell")) or None

    @property
    def transfer_message(self) -> str | None:
        return _text(self.data.get("transferMessage")) or None

    @property
    def destination(self) -> str | None:
        """The transfer number, separators removed when that makes it valid E.164."""
        raw = _text(self.data.get("destination")) or _text(self.data.get("phoneNumber"))
        if not raw:
            return None
        compact = _PHONE_SEPARATORS_RE.sub("", raw)
        return compact if _E164_RE.fullmatch(compact) else raw

    @property
    def cacheable(self) -> bool:
        """Whether replies here may be cached: explicit `data.cacheable`, else only for prompts without placeholders."""
        explicit = self.data.get("cacheable")
        if isinstance(explicit, bool):
            return explicit
        return not any(_PLACEHOLDER_RE.search(text) for text in self.prompt_texts())

    def prompt_texts(self) -> list[str]:
        return [self.prompt, _text(self.data.get("instructions")), _text(self.data.get("objective"))]


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
        return _UNCONDITIONAL_EDGE_TEXT


@dataclass(frozen=True)
class VariableSpec:
    """A value the LLM may extract from the conversation (`node_id` None: at any step)."""

    name: str
    type: str
    description: str | None
    enum_values: tuple | None
    node_id: str | None


class Workflow:
    """A parsed call flow; treat it as immutable (the store keeps it as a snapshot plus its hash)."""

    def __init__(
        self,
        *,
        name: str,
        global_prompt: str,
        nodes: dict[str, Node],
        edges: tuple[Edge, ...],
        variables: tuple[VariableSpec, ...],
        config: dict,
        language: str | None = None,
        parse_problems: Iterable[str] = (),
    ):
        self.name = name
        self.global_prompt = global_prompt
        self.nodes = nodes
        self.edges = edges
        self.variables = variables
        self.config = config
        self.language = language  # a make-call body's own `language`, if it had one
        self._parse_problems = list(parse_problems)
        self._outgoing: dict[str, list[Edge]] = {}
        for edge in edges:
            self._outgoing.setdefault(edge.source, []).append(edge)

    # ---------------------------------------------------------------- parsing

    @classmethod
    def from_payload(cls, payload: Mapping) -> "Workflow":
        """Build from an export file or a make-call body; never raises for content, only for shape (see `problems`)."""
        if not isinstance(payload, Mapping):
            raise WorkflowError(["workflow payload must be a JSON object"])
        problems: list[str] = []
        config = payload.get("config")
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise WorkflowError(["config must be an object"])
        config = _strip_secrets(dict(config))

        raw_nodes = payload.get("nodes")
        raw_edges = payload.get("edges")
        if raw_nodes is not None and not isinstance(raw_nodes, list):
            raise WorkflowError(["nodes must be a list"])
        if raw_edges is not None and not isinstance(raw_edges, list):
            raise WorkflowError(["edges must be a list"])
        raw_variables = payload.get("variables")
        if raw_variables is not None and not isinstance(raw_variables, list):
            raise WorkflowError(["variables must be a list"])

        too_big = [f"{what} has {len(items)} entries (at most {limit})"
                   for what, items, limit in (("nodes", raw_nodes or [], MAX_NODES), ("edges", raw_edges or [], MAX_EDGES),
                                              ("variables", raw_variables or [], MAX_NODES))
                   if len(items) > limit]
        if too_big:
            raise WorkflowError(too_big)

        nodes = _parse_nodes(raw_nodes or [], problems)
        edges = _parse_edges(raw_edges or [], problems)
        variables = _parse_variables(raw_variables or [], problems)

        start_nodes = [n for n in nodes.values() if n.kind == "start"]
        global_prompt = (
            _text(payload.get("globalPrompt"))
            or (_text(start_nodes[0].data.get("globalPrompt")) if start_nodes else "")
            or _config_system_prompt(config)
        )
        if not nodes and global_prompt:
            nodes, edges = _synthetic_graph()

        language = _text(payload.get("language")) or None
        name = (
            _text(payload.get("name"))
            or _text(config.get("name"))
            or _text(payload.get("workflowId"))
            or "Untitled workflow"
        )
        return cls(
            name=name,
            global_prompt=global_prompt,
            nodes=nodes,
            edges=edges,
            variables=variables,
            config=config,
            language=language,
            parse_problems=problems,
        )

    @classmethod
    def from_snapshot(cls, snapshot: Mapping) -> "Workflow":
        """Rebuild exactly what `to_snapshot` stored (any worker can then run the call)."""
        if not isinstance(snapshot, Mapping) or snapshot.get("snapshotVersion") != SNAPSHOT_VERSION:
            raise WorkflowError([f"not a workflow snapshot (snapshotVersion {SNAPSHOT_VERSION} expected)"])
        problems: list[str] = []
        return cls(
            name=_text(snapshot.get("name")),
            global_prompt=_text(snapshot.get("globalPrompt")),
            nodes=_parse_nodes(snapshot.get("nodes") or [], problems),
            edges=_parse_edges(snapshot.get("edges") or [], problems),
            variables=_parse_variables(snapshot.get("variables") or [], problems),
            config=_strip_secrets(dict(snapshot.get("config") or {})),
            language=snapshot.get("language"),
            parse_problems=problems,
        )

    def to_snapshot(self) -> dict:
        """JSON-safe canonical form, without secrets; `from_snapshot(s).to_snapshot() == s`."""
        return {
            "snapshotVersion": SNAPSHOT_VERSION,
            "name": self.name,
            "globalPrompt": self.global_prompt,
            "language": self.language,
            "config": _strip_secrets(copy.deepcopy(self.config)),
            "nodes": [
                {"id": n.id, "type": n.type, "data": _strip_secrets(copy.deepcopy(n.data))}
                for n in self.nodes.values()
            ],
            "edges": [_edge_to_dict(e) for e in self.edges],
            "variables": [_variable_to_dict(v) for v in self.variables],
        }

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
        canonical = json.dumps(self.to_snapshot(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ---------------------------------------------------------------- validation

    def problems(self) -> list[str]:
        """Everything that makes the workflow unusable, in a stable order."""
        problems = list(self._parse_problems)
        if len(self.global_prompt) > MAX_PROMPT_CHARS:
            problems.append(f"globalPrompt has {len(self.global_prompt)} characters (at most {MAX_PROMPT_CHARS})")
        for node in self.nodes.values():
            for text in node.prompt_texts():
                if len(text) > MAX_PROMPT_CHARS:
                    problems.append(f"{node.type} '{node.id}' has a prompt of {len(text)} characters "
                                    f"(at most {MAX_PROMPT_CHARS})")
        if not self.nodes:
            problems.append("workflow has no nodes and no globalPrompt to build one from")
            return problems
        starts = [n for n in self.nodes.values() if n.kind == "start"]
        if not starts:
            problems.append("no startNode")
        elif len(starts) > 1:
            problems.append("several startNodes: " + ", ".join(f"'{n.id}'" for n in starts))

        declared = {v.name for v in self.variables}
        for edge in self.edges:
            if edge.source not in self.nodes:
                problems.append(f"edge '{edge.id}' starts at unknown node '{edge.source}'")
            if edge.target not in self.nodes:
                problems.append(f"edge '{edge.id}' targets unknown node '{edge.target}'")
            problems.extend(_edge_condition_problems(edge, declared))

        for node in self.nodes.values():
            if node.kind == "conversation" and not node.prompt:
                problems.append(f"{node.type} '{node.id}' has no prompt")
            if node.kind == "transfer":
                destination = node.destination
                if destination is None:
                    problems.append(f"{node.type} '{node.id}' has no destination (an E.164 number such as +14155550100)")
                elif not _E164_RE.fullmatch(destination):
                    problems.append(
                        f"{node.type} '{node.id}' destination '{destination}' is not a valid E.164 number"
                    )

        if len(starts) == 1:
            reachable = self._reachable_from(starts[0].id)
            for node in self.nodes.values():
                if node.kind == "end" and node.id not in reachable:
                    problems.append(f"{node.type} '{node.id}' is unreachable from the start node")
                if node.id in reachable and not self._runnable(node):
                    problems.append(
                        f"node '{node.id}' has type '{node.type}', which the engine cannot run, "
                        "and is reachable from the start node"
                    )
        return problems

    def warnings(self) -> list[str]:
        """Non-fatal oddities worth showing to whoever built the flow."""
        warnings: list[str] = []
        starts = [n for n in self.nodes.values() if n.kind == "start"]
        reachable = self._reachable_from(starts[0].id) if len(starts) == 1 else set(self.nodes)
        for node in self.nodes.values():
            outgoing = self.outgoing(node.id)
            if node.id not in reachable and node.kind != "end":
                warnings.append(f"node '{node.id}' ({node.type}) is unreachable from the start node")
            if node.kind == "conversation" and not outgoing:
                warnings.append(
                    f"{node.type} '{node.id}' has no outgoing edge: the call stays there until the caller says goodbye"
                )
            if node.kind == "start" and not outgoing:
                warnings.append(f"{node.type} '{node.id}' has no outgoing edge: the whole call runs on the global prompt")
            if node.kind in ("end", "transfer") and outgoing:
                ids = ", ".join(f"'{e.id}'" for e in outgoing)
                warnings.append(f"edges {ids} leave {node.type} '{node.id}' and are never followed")
            unconditional = [e for e in outgoing if e.unconditional]
            if len(unconditional) > 1:
                ids = ", ".join(f"'{e.id}'" for e in unconditional)
                warnings.append(
                    f"node '{node.id}' has several unconditional edges ({ids}); mark one isDefault or give them conditions"
                )
        for spec in self.variables:
            if spec.type not in VARIABLE_TYPES:
                warnings.append(f"variable '{spec.name}' has unknown type '{spec.type}'; it is treated as a string")
            if spec.node_id not in (None, _SYSTEM_NODE_ID) and spec.node_id not in self.nodes:
                warnings.append(f"variable '{spec.name}' belongs to unknown node '{spec.node_id}'; no step records it")
        return warnings

    def validate(self) -> None:
        """Raise WorkflowError listing every problem, or return quietly."""
        problems = self.problems()
        if problems:
            raise WorkflowError(problems)

    # ---------------------------------------------------------------- navigation

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

    @property
    def default_language(self) -> str:
        settings = self.config.get("globalSettings")
        if isinstance(settings, Mapping) and _text(settings.get("defaultLanguage")):
            return _text(settings.get("defaultLanguage"))
        return _text(self.config.get("language")) or _text(self.language) or DEFAULT_LANGUAGE

    @property
    def llm_options(self) -> dict:
        """{temperature, max_tokens, model} from config.llm: the active provider's sub-config, azure, then top level."""
        llm = self.config.get("llm")
        llm = llm if isinstance(llm, Mapping) else {}
        sources = [sub for sub in _llm_sub_configs(llm)] + [llm]
        temperature = _first(sources, ("temperature",), _as_number)
        max_tokens = _first(sources, ("maxTokens", "max_tokens"), _as_int)
        model = _first(sources, ("model", "deploymentName"), lambda v: _text(v) or None)
        return {"temperature": temperature, "max_tokens": max_tokens, "model": model}

    def outgoing(self, node_id: str) -> list[Edge]:
        return list(self._outgoing.get(node_id, ()))

    def first_end_node(self) -> Node | None:
        return next((n for n in self.nodes.values() if n.kind == "end"), None)

    def entry_node_id(self) -> str:
        """Where the first caller turn is handled: past the start node and any other pass-through."""
        return self._settle(self.start_node.id, {})

    def variables_for(self, node_id: str) -> list[VariableSpec]:
        """Variables the LLM may record at this step: the step's own and the global ones, first declaration wins."""
        seen: set[str] = set()
        specs = []
        for spec in self.variables:
            if spec.node_id in (None, node_id) and spec.name not in seen:
                seen.add(spec.name)
                specs.append(spec)
        return specs

    def variable(self, name: str) -> VariableSpec | None:
        return next((v for v in self.variables if v.name == name), None)

    def _reachable_from(self, node_id: str) -> set[str]:
        seen = {node_id}
        queue = deque([node_id])
        while queue:
            for edge in self._outgoing.get(queue.popleft(), ()):
                if edge.target in self.nodes and edge.target not in seen:
                    seen.add(edge.target)
                    queue.append(edge.target)
        return seen

    def _runnable(self, node: Node) -> bool:
        if node.kind in ("start", "conversation", "end", "transfer"):
            return True
        # An unknown node type is harmless only as a pure pass-through; tools and audio would be silently skipped.
        return node.kind == "other" and self._unconditional_target(node.id) is not None

    def _unconditional_target(self, node_id: str) -> str | None:
        """The single unconditional way on from a node, when no LLM decision is offered there."""
        outgoing = self._outgoing.get(node_id, ())
        if any(e.kind in ("ai_based", "combined") for e in outgoing):
            return None
        unconditional = [e for e in outgoing if e.unconditional and e.target in self.nodes]
        if len(unconditional) > 1:
            unconditional = [e for e in unconditional if e.is_default]
        return unconditional[0].target if len(unconditional) == 1 else None

    def _settle(self, node_id: str, variables: Mapping[str, Any]) -> str:
        """Follow pass-through nodes (start/other) until a node that needs the caller; cycles stop where they loop."""
        seen: set[str] = set()
        while node_id not in seen:
            seen.add(node_id)
            node = self.nodes.get(node_id)
            if node is None or node.kind not in ("start", "other"):
                return node_id
            logical = _first_true_logical_edge(self._outgoing.get(node_id, ()), variables)
            target = logical.target if logical and logical.target in self.nodes else self._unconditional_target(node_id)
            if target is None:
                return node_id
            node_id = target
        return node_id

    def _node(self, node_id: str) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowError([f"unknown node '{node_id}'"])
        return node


# --------------------------------------------------------------------------- turns


@dataclass
class ConversationState:
    """Where a call is in the flow; the caller of this module persists it between turns."""

    current_node: str
    variables: dict[str, Any]
    messages: list[dict]


@dataclass(frozen=True)
class TurnPlan:
    """The single LLM request of a caller turn: reply text plus the routing/extraction tools."""

    node_id: str
    messages: list[dict]
    tools: list[dict] | None
    cacheable: bool
    system_prompt: str
    # Values of the variables the global and node prompts name ({{name}}): part of the reply cache's key.
    prompt_variables: dict[str, Any]


@dataclass(frozen=True)
class TurnOutcome:
    """Where the call goes after a turn, and what (if anything) to speak and do next."""

    next_node: str
    variables: dict[str, Any]
    action: str | None
    action_message: str | None
    destination: str | None
    transitioned_via: str | None
    keys: str | None = None          # keypad presses the model asked for (press_keys), sent as sendDigits


def plan_turn(
    workflow: Workflow,
    state: ConversationState,
    utterance: str,
    *,
    language_instruction: str = "",
    history_limit: int = DEFAULT_HISTORY_LIMIT,
    keypad: bool = False,
) -> TurnPlan:
    """Build the turn's one LLM request; routing and extraction ride along as tools so no second call is needed.

    `keypad` offers `press_keys` (calls we placed may reach a phone menu rather than a person).
    """
    node_id = workflow._settle(state.current_node, state.variables)
    node = workflow._node(node_id)

    offered = [e for e in workflow.outgoing(node_id) if e.decided_by_llm and e.target in workflow.nodes]
    specs = [v for v in workflow.variables_for(node_id)]
    tools: list[dict] = []
    if offered:
        tools.append(_transition_tool(workflow, offered))
    if specs:
        tools.append(_record_variables_tool(specs))
    if keypad:
        tools.append(_PRESS_KEYS_TOOL_SPEC)

    values_used = False
    sections: list[str] = []
    prompt_texts = [workflow.global_prompt, *node.prompt_texts()]
    prompt_variables = {name: state.variables.get(name)
                        for text in prompt_texts for name in _PLACEHOLDER_RE.findall(text or "")}
    global_prompt, used = _fill_placeholders(workflow.global_prompt, state.variables)
    values_used |= used
    if global_prompt:
        sections.append(global_prompt)
    step_lines = [f"Current step: {node.label}"] if node.label else []
    for heading, text in (("", node.prompt), ("Instructions: ", _text(node.data.get("instructions"))),
                          ("Objective: ", _text(node.data.get("objective")))):
        filled, used = _fill_placeholders(text, state.variables)
        values_used |= used
        if filled:
            step_lines.append(heading + filled)
    if step_lines:
        sections.append("\n".join(step_lines))
    if language_instruction.strip():
        sections.append(language_instruction.strip())
    sections.append(_PHONE_CALL_GUIDANCE)
    routing = []
    if tools:
        routing.append(_REPLY_FIRST_GUIDANCE)
    if offered:
        routing.append(_TRANSITION_GUIDANCE)
    if specs:
        routing.append(_RECORD_GUIDANCE)
    if keypad:
        routing.append(_KEYPAD_GUIDANCE)
    if any(workflow.nodes[e.target].kind in ("end", "transfer") for e in workflow.outgoing(node_id)
           if e.target in workflow.nodes):
        routing.append(_CLOSING_GUIDANCE)
    if routing:
        sections.append(" ".join(routing))
    system_prompt = "\n\n".join(sections)

    history = [
        {"role": m["role"], "content": m.get("content") or ""}
        for m in state.messages
        if isinstance(m, Mapping) and m.get("role") in ("user", "assistant")
    ]
    history = history[-history_limit:] if history_limit > 0 else []
    messages = [{"role": "system", "content": system_prompt}, *history, {"role": "user", "content": utterance}]
    return TurnPlan(
        node_id=node_id,
        messages=messages,
        tools=tools or None,
        cacheable=node.cacheable and not values_used,
        system_prompt=system_prompt,
        prompt_variables=prompt_variables,
    )


def apply_turn(
    workflow: Workflow,
    state: ConversationState,
    reply_text: str,
    tool_calls: list[tuple[str, Any]],
) -> TurnOutcome:
    """Interpret the streamed reply's tool calls: record variables, then a true logical edge, else `transition`, else stay.

    `reply_text` is what was spoken; routing never depends on it (it is accepted so callers pass the whole result).
    Arguments may be dicts or the raw JSON strings the API streams; malformed ones are ignored.
    """
    node_id = workflow._settle(state.current_node, state.variables)
    workflow._node(node_id)  # an unknown node is a caller bug: fail loudly rather than stall the call
    variables = dict(state.variables)
    transition_ids: list[str] = []
    keys = ""
    for name, raw_args in tool_calls:
        args = _tool_arguments(raw_args)
        if name == RECORD_VARIABLES_TOOL:
            for var_name, value in args.items():
                spec = workflow.variable(var_name)
                if spec is None or value is None:
                    continue
                coerced = _coerce(spec, value)
                if coerced is not _REJECTED:
                    variables[var_name] = coerced
        elif name == TRANSITION_TOOL and isinstance(args.get("edge_id"), str):
            transition_ids.append(args["edge_id"])
        elif name == PRESS_KEYS_TOOL and isinstance(args.get("digits"), str) and _KEYS.match(args["digits"]):
            keys += args["digits"]

    outgoing = workflow.outgoing(node_id)
    via: str | None = None
    next_node = node_id
    logical = _first_true_logical_edge(outgoing, variables)
    if logical is not None and logical.target in workflow.nodes:
        next_node, via = logical.target, f"logical:{logical.id}"
    else:
        offered = {e.id: e for e in outgoing if e.decided_by_llm and e.target in workflow.nodes}
        chosen = next((offered[i] for i in transition_ids if i in offered), None)
        if chosen is not None:
            next_node, via = chosen.target, chosen.id
    if via is not None:
        next_node = workflow._settle(next_node, variables)
    landing = _landing(workflow, next_node, variables, via)
    return replace_fields(landing, keys=keys[:32]) if keys else landing


def termination_outcome(workflow: Workflow, state: ConversationState) -> TurnOutcome:
    """The caller said goodbye: end via the nearest endCall node (one reachable from here, else the first)."""
    ends = [n for n in workflow.nodes.values() if n.kind == "end"]
    if not ends:
        return TurnOutcome(
            next_node=state.current_node,
            variables=dict(state.variables),
            action="end",
            action_message=None,
            destination=None,
            transitioned_via="termination_phrase",
        )
    reachable = workflow._reachable_from(state.current_node) if state.current_node in workflow.nodes else set()
    end = next((n for n in ends if n.id in reachable), ends[0])
    return TurnOutcome(
        next_node=end.id,
        variables=dict(state.variables),
        action="end",
        action_message=end.end_message,
        destination=None,
        transitioned_via="termination_phrase",
    )


def detect_termination(utterance: str, phrases: Iterable[str]) -> bool:
    """True when the utterance is, or ends with, a goodbye phrase at a word boundary; no LLM involved.

    Matching only at the end keeps "I'll call back about the bye-law tomorrow" on the line while
    "ok, that's all, thanks bye" ends the call. CJK phrases match as plain suffixes (no spaces between words).
    """
    text = _normalise_speech(utterance)
    if not text:
        return False
    compact = text.replace(" ", "")
    for raw_phrase in phrases:
        phrase = _normalise_speech(raw_phrase)
        if not phrase:
            continue
        if any(_is_cjk(ch) for ch in phrase):
            if compact.endswith(phrase.replace(" ", "")):
                return True
            continue
        if text == phrase:
            return True
        if text.endswith(phrase):
            before = text[-len(phrase) - 1]
            if before == " " or _is_cjk(before):
                return True
    return False


# --------------------------------------------------------------------------- conditions and variables


def conditions_hold(conditions: Iterable[LogicalCondition], variables: Mapping[str, Any]) -> bool:
    """Evaluate a logical edge left to right, `combine_with` joining each condition to the one before.

    That is how the web app's editor previews the conditions, so it is what the flow's author expects.
    """
    result: bool | None = None
    for condition in conditions:
        value = _condition_holds(condition, variables)
        if result is None:
            result = value
        elif (condition.combine_with or "and") == "or":
            result = result or value
        else:
            result = result and value
    return bool(result)


def coerce_variable(spec: VariableSpec, value: Any) -> tuple[bool, Any]:
    """(ok, typed value) for an extracted value; not ok when it does not fit the declared type or enum."""
    coerced = _coerce(spec, value)
    return (False, None) if coerced is _REJECTED else (True, coerced)


def _coerce(spec: VariableSpec, value: Any) -> Any:
    if spec.type in ("number", "integer"):
        if isinstance(value, str):  # spoken amounts arrive as "$1,250" as often as 1250
            value = value.replace(",", "").replace("_", "").strip().lstrip("$€£¥").strip()
        number = _as_number(value)
        if number is None:
            return _REJECTED
        if float(number).is_integer():
            number = int(number)
        elif spec.type == "integer":
            return _REJECTED
        if spec.enum_values and not any(_as_number(e) == number for e in spec.enum_values):
            return _REJECTED
        return number
    if spec.type == "boolean":
        flag = _as_bool(value)
        return _REJECTED if flag is None else flag
    if isinstance(value, (dict, list)):
        return _REJECTED
    text = str(value).strip() if not isinstance(value, bool) else ("true" if value else "false")
    if not text:
        return _REJECTED
    if spec.enum_values:
        match = next((e for e in spec.enum_values if str(e).strip().casefold() == text.casefold()), None)
        return _REJECTED if match is None else match
    return text


def _condition_holds(condition: LogicalCondition, variables: Mapping[str, Any]) -> bool:
    """An unset variable makes every comparison false: routing never fires on missing information."""
    actual = variables.get(condition.variable)
    if actual is None:
        return False
    expected = condition.value
    op = condition.operator
    if op == "==":
        return _loosely_equal(actual, expected)
    if op == "!=":
        return not _loosely_equal(actual, expected)
    if op in ("contains", "not_contains"):
        if isinstance(actual, (list, tuple, set)):
            found = any(_loosely_equal(item, expected) for item in actual)
        else:
            found = _plain(expected).casefold() in _plain(actual).casefold()
        return found if op == "contains" else not found
    if op in (">", "<", ">=", "<="):
        left, right = _as_number(actual), _as_number(expected)
        if left is None or right is None:
            if isinstance(actual, str) and isinstance(expected, str):
                left, right = actual.strip().casefold(), expected.strip().casefold()
            else:
                return False
        return {">": left > right, "<": left < right, ">=": left >= right, "<=": left <= right}[op]
    return False


def _loosely_equal(actual: Any, expected: Any) -> bool:
    left, right = _as_number(actual), _as_number(expected)
    if left is not None and right is not None:
        return left == right
    if isinstance(actual, bool) or isinstance(expected, bool):
        a, b = _as_bool(actual), _as_bool(expected)
        return a is not None and a == b
    return _plain(actual).casefold() == _plain(expected).casefold()


def _first_true_logical_edge(edges: Iterable[Edge], variables: Mapping[str, Any]) -> Edge | None:
    for edge in edges:
        if edge.kind == "logical" and edge.logical_conditions and conditions_hold(edge.logical_conditions, variables):
            return edge
    return None


def _edge_condition_problems(edge: Edge, declared: set[str]) -> list[str]:
    if edge.kind not in EDGE_KINDS:
        return [f"edge '{edge.id}' has unknown condition type '{edge.kind}' (expected one of {', '.join(EDGE_KINDS)})"]
    if edge.kind == "ai_based" and not edge.ai_condition:
        return [f"ai_based edge '{edge.id}' has no aiCondition"]
    if edge.kind == "combined" and not edge.combined_condition:
        return [f"combined edge '{edge.id}' has no combinedCondition"]
    if edge.kind != "logical":
        return []
    if not edge.logical_conditions:
        return [f"logical edge '{edge.id}' has no logicalConditions"]
    problems = []
    for number, condition in enumerate(edge.logical_conditions, start=1):
        where = f"edge '{edge.id}' condition {number}"
        if not condition.variable:
            problems.append(f"{where} names no variable")
        elif condition.variable not in declared:
            problems.append(f"{where} uses undeclared variable '{condition.variable}'")
        if condition.operator not in OPERATORS:
            problems.append(
                f"{where} uses unknown operator '{condition.operator}' (expected one of {' '.join(OPERATORS)})"
            )
        if condition.combine_with not in (None, "and", "or"):
            problems.append(f"{where} has unknown combineWith '{condition.combine_with}' (expected and or or)")
    return problems


# --------------------------------------------------------------------------- tools and landing


def _transition_tool(workflow: Workflow, edges: list[Edge]) -> dict:
    lines = []
    for edge in edges:
        target = workflow.nodes[edge.target]
        lines.append(f"- {edge.id}: {edge.condition_text()} (next step: {target.label or target.id})")
    description = (
        "Move the conversation to the next step. Call it after your spoken reply, "
        "and only when one of these conditions is met:\n" + "\n".join(lines)
    )
    return {
        "type": "function",
        "function": {
            "name": TRANSITION_TOOL,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "edge_id": {
                        "type": "string",
                        "enum": [e.id for e in edges],
                        "description": "The id of the condition that is met.",
                    }
                },
                "required": ["edge_id"],
                "additionalProperties": False,
            },
        },
    }


_PRESS_KEYS_TOOL_SPEC = {
    "type": "function",
    "function": {
        "name": PRESS_KEYS_TOOL,
        "description": ("Press keys on the phone keypad, to get through an automated phone menu that asks you to "
                        "press a key. Use only when a recorded menu asks for it."),
        "parameters": {
            "type": "object",
            "properties": {"digits": {"type": "string", "pattern": "^[0-9*#w]{1,32}$",
                                      "description": "Keys to press in order: 0-9, * and #; w waits half a second."}},
            "required": ["digits"],
            "additionalProperties": False,
        },
    },
}


def _record_variables_tool(specs: list[VariableSpec]) -> dict:
    properties = {}
    for spec in specs:
        schema: dict[str, Any] = {"type": _JSON_SCHEMA_TYPES.get(spec.type, "string")}
        if spec.description:
            schema["description"] = spec.description
        if spec.enum_values:
            schema["enum"] = list(spec.enum_values)
        properties[spec.name] = schema
    return {
        "type": "function",
        "function": {
            "name": RECORD_VARIABLES_TOOL,
            "description": (
                "Record details the caller has given. Call it after your spoken reply; "
                "include only values the caller actually stated."
            ),
            "parameters": {"type": "object", "properties": properties, "additionalProperties": False},
        },
    }


def _landing(workflow: Workflow, node_id: str, variables: dict[str, Any], via: str | None) -> TurnOutcome:
    node = workflow.nodes.get(node_id)
    action = message = destination = None
    if node is not None and node.kind == "end":
        action, message = "end", node.end_message
    elif node is not None and node.kind == "transfer":
        action, message, destination = "transfer", node.transfer_message, node.destination
    return TurnOutcome(
        next_node=node_id,
        variables=variables,
        action=action,
        action_message=message,
        destination=destination,
        transitioned_via=via,
    )


def _tool_arguments(raw: Any) -> dict:
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, (str, bytes)):
        try:
            parsed = json.loads(raw or "{}")
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _fill_placeholders(text: str, variables: Mapping[str, Any]) -> tuple[str, bool]:
    """Replace {{name}} with the variable's value; report whether any value went in (that turn is then not cacheable)."""
    used = False

    def replace(match: re.Match) -> str:
        nonlocal used
        value = variables.get(match.group(1))
        if value is None or value == "":
            return _UNKNOWN_VALUE_TEXT
        used = True
        return _plain(value)

    return _PLACEHOLDER_RE.sub(replace, text), used


# --------------------------------------------------------------------------- parsing helpers


def _parse_nodes(raw_nodes: list, problems: list[str]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for index, raw in enumerate(raw_nodes):
        if not isinstance(raw, Mapping):
            problems.append(f"node #{index + 1} is not an object")
            continue
        node_id = _text(raw.get("id"))
        if not node_id:
            problems.append(f"node #{index + 1} has no id")
            continue
        if node_id in nodes:
            problems.append(f"duplicate node id '{node_id}'")
            continue
        data = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
        # Only id, type and data are kept: React Flow's canvas keys (position, measured, selected, dragging)
        # must not change the version hash.
        data = _strip_secrets(copy.deepcopy(dict(data)))
        node_type = _text(raw.get("type")) or "unknown"
        nodes[node_id] = Node(id=node_id, type=node_type, label=_text(data.get("label")), data=data)
    return nodes


def _parse_edges(raw_edges: list, problems: list[str]) -> tuple[Edge, ...]:
    edges: list[Edge] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_edges):
        if not isinstance(raw, Mapping):
            problems.append(f"edge #{index + 1} is not an object")
            continue
        edge_id = _text(raw.get("id"))
        if not edge_id:
            problems.append(f"edge #{index + 1} has no id")
            continue
        if edge_id in seen:
            problems.append(f"duplicate edge id '{edge_id}'")
            continue
        seen.add(edge_id)
        data = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
        conditions = []
        raw_conditions = data.get("logicalConditions")
        for c_index, c in enumerate(raw_conditions if isinstance(raw_conditions, list) else []):
            if not isinstance(c, Mapping):
                problems.append(f"edge '{edge_id}' condition {c_index + 1} is not an object")
                continue
            combine = _text(c.get("combineWith")).lower() or None
            conditions.append(LogicalCondition(
                variable=_text(c.get("variable")),
                operator=_text(c.get("operator")).lower(),
                value=copy.deepcopy(c.get("value")),
                combine_with=combine,
            ))
        edges.append(Edge(
            id=edge_id,
            source=_text(raw.get("source")),
            target=_text(raw.get("target")),
            kind=_text(data.get("type")) or "none",
            is_default=bool(data.get("isDefault")),
            ai_condition=_text(data.get("aiCondition")) or None,
            logical_conditions=tuple(conditions),
            combined_condition=_text(data.get("combinedCondition")) or None,
            description=_text(data.get("description")) or None,
        ))
    return tuple(edges)


def _parse_variables(raw_variables: list, problems: list[str]) -> tuple[VariableSpec, ...]:
    specs: list[VariableSpec] = []
    for index, raw in enumerate(raw_variables):
        if raw is None:  # real exports contain [null]
            continue
        if not isinstance(raw, Mapping) or not _text(raw.get("name")):
            problems.append(f"variable #{index + 1} has no name")
            continue
        enum = raw.get("enumValues")
        enum_values = tuple(e for e in enum if e is not None and e != "") if isinstance(enum, list) else ()
        specs.append(VariableSpec(
            name=_text(raw.get("name")),
            type=(_text(raw.get("type")) or "string").lower(),
            description=_text(raw.get("description")) or None,
            enum_values=enum_values or None,
            node_id=_text(raw.get("nodeId")) or None,
        ))
    return tuple(specs)


def _edge_to_dict(edge: Edge) -> dict:
    data: dict[str, Any] = {"type": edge.kind, "isDefault": edge.is_default}
    if edge.ai_condition is not None:
        data["aiCondition"] = edge.ai_condition
    if edge.logical_conditions:
        data["logicalConditions"] = [
            {"variable": c.variable, "operator": c.operator, "value": copy.deepcopy(c.value),
             **({"combineWith": c.combine_with} if c.combine_with else {})}
            for c in edge.logical_conditions
        ]
    if edge.combined_condition is not None:
        data["combinedCondition"] = edge.combined_condition
    if edge.description is not None:
        data["description"] = edge.description
    return {"id": edge.id, "source": edge.source, "target": edge.target, "data": data}


def _variable_to_dict(spec: VariableSpec) -> dict:
    return {
        "name": spec.name,
        "type": spec.type,
        "description": spec.description,
        "enumValues": list(spec.enum_values) if spec.enum_values else None,
        "nodeId": spec.node_id,
    }


def _synthetic_graph() -> tuple[dict[str, Node], tuple[Edge, ...]]:
    """The original accepted a bare globalPrompt: one start step leading to one step run by that prompt."""
    start = Node(id="start", type="startNode", label="Start", data={"label": "Start"})
    talk = Node(
        id="conversation",
        type="conversationNode",
        label="Conversation",
        data={"label": "Conversation", "prompt": "Help the caller, following the instructions above."},
    )
    edge = Edge(
        id="start_to_conversation", source="start", target="conversation", kind="none", is_default=True,
        ai_condition=None, logical_conditions=(), combined_condition=None, description=None,
    )
    return {start.id: start, talk.id: talk}, (edge,)


def _is_secret_key(key: str) -> bool:
    normal = re.sub(r"[^a-z0-9]", "", key.lower())
    return (
        normal.endswith("token")  # authToken, accessToken, token; not maxTokens
        or any(part in normal for part in ("apikey", "secret", "password", "passwd", "privatekey", "accesskey"))
        or normal == "authorization"
    )


def _strip_secrets(value: Any) -> Any:
    """Drop secret-looking keys at any depth: snapshots are stored and logged, credentials come from the server."""
    if isinstance(value, Mapping):
        return {k: _strip_secrets(v) for k, v in value.items() if not (isinstance(k, str) and _is_secret_key(k))}
    if isinstance(value, list):
        return [_strip_secrets(v) for v in value]
    return value


_PROVIDER_SUB_CONFIG = {"azure_openai": "azure", "azure": "azure", "openai": "openai",
                        "anthropic": "anthropic", "google_palm": "google"}


def _llm_sub_configs(llm: Mapping) -> list[Mapping]:
    """The active provider's sub-config first, then azure's, then any other (the exports use `azure`)."""
    keys = [_PROVIDER_SUB_CONFIG.get(_text(llm.get("provider")).lower(), ""), "azure"]
    keys += [k for k, v in llm.items() if isinstance(v, Mapping)]
    seen: list[str] = []
    for key in keys:
        if key and key not in seen and isinstance(llm.get(key), Mapping):
            seen.append(key)
    return [llm[k] for k in seen]


def _config_system_prompt(config: Mapping) -> str:
    llm = config.get("llm")
    if not isinstance(llm, Mapping):
        return ""
    for source in [*_llm_sub_configs(llm), llm]:
        text = _text(source.get("systemPrompt"))
        if text:
            return text
    return ""


def _first(sources: list[Mapping], keys: tuple[str, ...], convert) -> Any:
    for source in sources:
        for key in keys:
            if key in source:
                value = convert(source[key])
                if value is not None:
                    return value
    return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _plain(value: Any) -> str:
    """A value as it reads in a prompt or comparison (floats that are whole numbers lose the '.0')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _as_number(value: Any) -> int | float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and value.strip():
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _as_int(value: Any) -> int | None:
    number = _as_number(value)
    return int(number) if number is not None and float(number).is_integer() else None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().casefold()
        if text in ("true", "yes", "y", "1"):
            return True
        if text in ("false", "no", "n", "0"):
            return False
    return None


def _normalise_speech(text: str) -> str:
    """NFKC, casefold, apostrophes removed (STT writes "thats" and "that's"), other punctuation and symbols to spaces."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        out.append(" " if unicodedata.category(ch)[0] in "PSZC" else ch)
    return " ".join("".join(out).split())


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(low <= code <= high for low, high in _CJK_RANGES)
