"""The web app's export format ↔ the model: the only module that knows the export's field names."""

from __future__ import annotations

import copy
import functools
import hashlib
import marshal
import math
import re
from collections import OrderedDict
from typing import Any, Iterator, Mapping

from ...units import SECONDS_PER_MINUTE
from .conditions import as_number
from .model import (DEFAULT_LANGUAGE, E164_RE, MAX_EDGES, MAX_NODES, SNAPSHOT_VERSION, CallLimits, Edge,
                    LlmOptions, LogicalCondition, Node, NodeAudio, VariableSpec, Workflow, WorkflowError)

# Node `type` strings the web app (and its older versions) writes, by the kind the engine runs.
_NODE_KINDS: dict[str, str] = {
    "startnode": "start", "start": "start", "startcall": "start",
    "conversationnode": "conversation", "conversation": "conversation", "ainode": "conversation",
    "endcall": "end", "endnode": "end", "end": "end",
    "transfercall": "transfer", "transfer": "transfer", "transfernode": "transfer",
    "playaudio": "audio", "audio": "audio", "audionode": "audio", "playaudionode": "audio",
    "toolnode": "tool", "tool": "tool", "apirequest": "tool", "apirequestnode": "tool",
}
_PHONE_SEPARATORS_RE = re.compile(r"[\s().\-]")
_PROVIDER_SUB_CONFIG = {"azure_openai": "azure", "azure": "azure", "openai": "openai",
                        "anthropic": "anthropic", "google_palm": "google"}


# Every field of an export or make-call body that `workflow_from_payload` reads (a test holds it to that).
PAYLOAD_FIELDS = ("config", "nodes", "edges", "variables", "globalPrompt", "language", "name", "workflowId")


# The cache key's encoding of the parsed fields: marshal's version 2 writes every value with its type (null, false,
# 0, 0.0, -0.0 and NaN all differ, as in JSON text) and, unlike versions 3 and 4, never a back-reference or an
# "interned" mark, which would depend on object identity. 12.7 KB of the bench's flow: 63 → 24 µs with the sha256
# (the standard library's json.dumps before; orjson would write NaN as null). docs/performance-history.md, "p-setup".
_KEY_MARSHAL_VERSION = 2


class ValidatedWorkflows:
    """Validated Workflows by the content of the body fields they were parsed from, shared by the calls of one flow.

    The web app sends the whole flow with every make-call; parsing, validating and snapshotting it again for each
    call of the same flow was most of make-call's own work. A Workflow is immutable, so calls can share it. The key
    is a sha256 of those fields' values and types (a body's `to` or `timeout` never matter); a body whose fields come in
    another order is a miss, never a wrong hit. Held by the worker's services, at most `limit` flows, least
    recently used first out. A workflow with problems is never kept: it raises WorkflowError each time."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._by_key: OrderedDict[bytes, Workflow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, payload: Mapping) -> Workflow:
        """`payload`'s workflow, parsed and validated (raises WorkflowError listing its problems)."""
        fields = [payload.get(name) for name in PAYLOAD_FIELDS]
        key = hashlib.sha256(marshal.dumps(fields, _KEY_MARSHAL_VERSION)).digest()
        workflow = self._by_key.get(key)
        if workflow is not None:
            self._by_key.move_to_end(key)
            return workflow
        workflow = workflow_from_payload(dict(zip(PAYLOAD_FIELDS, fields)))
        workflow.validate()
        workflow.version_hash  # noqa: B018  (computed once here, shared by every call of the flow)
        self._by_key[key] = workflow
        while len(self._by_key) > self.limit:
            self._by_key.popitem(last=False)
        return workflow


def workflow_from_payload(payload: Mapping) -> Workflow:
    """An export file or a make-call body as a Workflow; raises only for shape, content problems are kept."""
    if not isinstance(payload, Mapping):
        raise WorkflowError(["workflow payload must be a JSON object"])
    problems: list[str] = []
    config = payload.get("config")
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise WorkflowError(["config must be an object"])
    config = strip_secrets(dict(config))

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
    return _workflow(name, global_prompt, nodes, edges, variables, config, language, problems)


def workflow_from_snapshot(snapshot: Mapping) -> Workflow:
    """Rebuild exactly what `workflow_to_snapshot` stored (any worker can then run the call)."""
    if not isinstance(snapshot, Mapping) or snapshot.get("snapshotVersion") != SNAPSHOT_VERSION:
        raise WorkflowError([f"not a workflow snapshot (snapshotVersion {SNAPSHOT_VERSION} expected)"])
    problems: list[str] = []
    return _workflow(
        _text(snapshot.get("name")),
        _text(snapshot.get("globalPrompt")),
        _parse_nodes(snapshot.get("nodes") or [], problems),
        _parse_edges(snapshot.get("edges") or [], problems),
        _parse_variables(snapshot.get("variables") or [], problems),
        strip_secrets(dict(snapshot.get("config") or {})),
        snapshot.get("language"),
        problems,
    )


def workflow_to_snapshot(workflow: Workflow) -> dict:
    """JSON-safe canonical form in the export's own field names, without secrets."""
    return {
        "snapshotVersion": SNAPSHOT_VERSION,
        "name": workflow.name,
        "globalPrompt": workflow.global_prompt,
        "language": workflow.language,
        "config": strip_secrets(copy.deepcopy(workflow.config)),
        "nodes": [
            {"id": n.id, "type": n.type, "data": strip_secrets(copy.deepcopy(n.data))}
            for n in workflow.nodes.values()
        ],
        "edges": [_edge_to_dict(e) for e in workflow.edges],
        "variables": [_variable_to_dict(v) for v in workflow.variables],
    }


def strip_secrets(value: Any) -> Any:
    """Drop secret-looking keys at any depth: snapshots are stored and logged, credentials come from the server."""
    if type(value) is dict or isinstance(value, Mapping):  # the exact-type check first: ABC checks are slow
        return {k: strip_secrets(v) for k, v in value.items() if not (isinstance(k, str) and _is_secret_key(k))}
    if type(value) is list or isinstance(value, list):
        return [strip_secrets(v) for v in value]
    return value


def _workflow(name: str, global_prompt: str, nodes: dict[str, Node], edges: tuple[Edge, ...],
              variables: tuple[VariableSpec, ...], config: dict, language: str | None,
              problems: list[str]) -> Workflow:
    return Workflow(
        name=name,
        global_prompt=global_prompt,
        nodes=nodes,
        edges=edges,
        variables=variables,
        config=config,
        language=language,
        default_language=_default_language(config, language),
        llm_settings=_llm_options(config),
        limits=_call_limits(config),
        parse_problems=tuple(problems),
    )


def _default_language(config: Mapping, language: Any) -> str:
    settings = config.get("globalSettings")
    if isinstance(settings, Mapping) and _text(settings.get("defaultLanguage")):
        return _text(settings.get("defaultLanguage"))
    return _text(config.get("language")) or _text(language) or DEFAULT_LANGUAGE


# Bounds of a flow's own limits: a minute is the shortest call limit an operator may set (MAX_CALL_DURATION_S);
# a silence longer than ten minutes is no silence handling (SILENCE_TIMEOUT_S has the same bound).
MIN_CALL_LIMIT_S = 60
MAX_FLOW_SILENCE_S = 600


def _call_limits(config: Mapping) -> CallLimits:
    """globalSettings.maxCallDuration (minutes) and silenceTimeout (seconds). As for the LLM options, a value that
    is no positive finite number is ignored (the server's setting applies): the editor stores whatever was typed.
    A silenceTimeout of 0 turns silence handling off, as SILENCE_TIMEOUT_S=0 does."""
    settings = config.get("globalSettings")
    settings = settings if isinstance(settings, Mapping) else {}
    minutes = as_number(settings.get("maxCallDuration"))
    seconds = as_number(settings.get("silenceTimeout"))
    return CallLimits(
        # a huge value is simply above the operator's cap, which then applies (CallLimits.time_limit_s)
        max_call_duration_s=(max(MIN_CALL_LIMIT_S, math.ceil(min(minutes, 1e6) * SECONDS_PER_MINUTE))
                             if minutes and minutes > 0 else None),
        silence_timeout_s=float(seconds) if seconds is not None and 0 <= seconds <= MAX_FLOW_SILENCE_S else None,
    )


MAX_TEMPERATURE = 2  # OpenAI's and Azure OpenAI's documented range is 0 to 2
# A flow's maxTokens above this is capped to it. Above a model's output limit (gpt-35-turbo 4096, gpt-4o 16384) every
# turn is refused with a 400; a turn never speaks more than speech.MAX_TURN_REPLY_BYTES and a token is at least one
# byte, so 4096 leaves every reply, and room for a tool call's arguments, as a larger value would.
MAX_TURN_TOKENS = 4096


def _llm_options(config: Mapping) -> LlmOptions:
    """config.llm's settings: the active provider's sub-config, azure, then the top level."""
    llm = config.get("llm")
    llm = llm if isinstance(llm, Mapping) else {}
    sources = [*_llm_sub_configs(llm), llm]
    # Values every provider refuses (a 400 for the whole turn) are ignored: the provider's default applies.
    temperature = _first(sources, ("temperature",), as_number)
    max_tokens = _first(sources, ("maxTokens", "max_tokens"), _as_int)
    return LlmOptions(
        temperature=temperature if temperature is not None and 0 <= temperature <= MAX_TEMPERATURE else None,
        max_tokens=min(max_tokens, MAX_TURN_TOKENS) if max_tokens is not None and max_tokens >= 1 else None,
        model=_first(sources, ("model", "deploymentName"), lambda v: _text(v) or None),
    )


def _node(node_id: str, node_type: str, data: dict) -> Node:
    explicit_cacheable = data.get("cacheable")
    audio_url = _text(data.get("audioUrl"))
    audio_interruptible = data.get("audioInterruptible")
    return Node(
        id=node_id,
        type=node_type,
        kind=_NODE_KINDS.get(node_type.replace("_", "").replace("-", "").lower(), "other"),
        label=_text(data.get("label")),
        data=data,
        prompt=_text(data.get("prompt")),
        instructions=_text(data.get("instructions")),
        objective=_text(data.get("objective")),
        first_message=_text(data.get("firstMessage")) or None,
        # The editor's schema names the field `farewell`; the exports write `endMessage`.
        end_message=_text(data.get("endMessage")) or _text(data.get("farewell")) or None,
        transfer_message=_text(data.get("transferMessage")) or None,
        destination=_destination(_text(data.get("destination")) or _text(data.get("phoneNumber"))),
        cacheable_override=explicit_cacheable if isinstance(explicit_cacheable, bool) else None,
        audio=NodeAudio(audio_url, audio_interruptible if isinstance(audio_interruptible, bool) else None)
        if audio_url else None,
    )


def _destination(raw: str) -> str | None:
    if not raw:
        return None
    compact = _PHONE_SEPARATORS_RE.sub("", raw)
    return compact if E164_RE.fullmatch(compact) else raw


def _with_unique_ids(raw_items: list, what: str, problems: list[str]) -> Iterator[tuple[str, Mapping, Mapping]]:
    """(id, entry, entry's data) for each object with an id not seen before; every other entry becomes a problem."""
    seen: set[str] = set()
    for index, raw in enumerate(raw_items):
        if not isinstance(raw, Mapping):
            problems.append(f"{what} #{index + 1} is not an object")
            continue
        item_id = _text(raw.get("id"))
        if not item_id:
            problems.append(f"{what} #{index + 1} has no id")
            continue
        if item_id in seen:
            problems.append(f"duplicate {what} id '{item_id}'")
            continue
        seen.add(item_id)
        yield item_id, raw, raw.get("data") if isinstance(raw.get("data"), Mapping) else {}


def _parse_nodes(raw_nodes: list, problems: list[str]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for node_id, raw, data in _with_unique_ids(raw_nodes, "node", problems):
        # Only id, type and data are kept: React Flow's canvas keys (position, measured, selected, dragging)
        # must not change the version hash.
        data = strip_secrets(copy.deepcopy(dict(data)))
        nodes[node_id] = _node(node_id, _text(raw.get("type")) or "unknown", data)
    return nodes


def _parse_edges(raw_edges: list, problems: list[str]) -> tuple[Edge, ...]:
    edges: list[Edge] = []
    for edge_id, raw, data in _with_unique_ids(raw_edges, "edge", problems):
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
    start = _node("start", "startNode", {"label": "Start"})
    talk = _node("conversation", "conversationNode",
                 {"label": "Conversation", "prompt": "Help the caller, following the instructions above."})
    edge = Edge(
        id="start_to_conversation", source="start", target="conversation", kind="none", is_default=True,
        ai_condition=None, logical_conditions=(), combined_condition=None, description=None,
    )
    return {start.id: start, talk.id: talk}, (edge,)


@functools.lru_cache(maxsize=4096)  # a flow's keys repeat in every node and every call
def _is_secret_key(key: str) -> bool:
    normal = re.sub(r"[^a-z0-9]", "", key.lower())
    return (
        normal.endswith("token")  # authToken, accessToken, token; not maxTokens
        or any(part in normal for part in ("apikey", "secret", "password", "passwd", "privatekey", "accesskey"))
        or normal == "authorization"
    )


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


def _as_int(value: Any) -> int | None:
    number = as_number(value)
    return int(number) if number is not None and float(number).is_integer() else None
