"""What makes a workflow unusable (problems) or merely odd (warnings), each message precise enough to fix."""

from __future__ import annotations

import re

from .model import (E164_RE, EDGE_KINDS, MAX_PROMPT_CHARS, OPERATORS, SYSTEM_NODE_ID, VARIABLE_TYPES, Edge,
                    Workflow)


def workflow_problems(workflow: Workflow) -> list[str]:
    """Everything that makes the workflow unusable, in a stable order."""
    problems = list(workflow.parse_problems)
    if len(workflow.global_prompt) > MAX_PROMPT_CHARS:
        problems.append(f"globalPrompt has {len(workflow.global_prompt)} characters (at most {MAX_PROMPT_CHARS})")
    for node in workflow.nodes.values():
        for text in node.prompt_texts():
            if len(text) > MAX_PROMPT_CHARS:
                problems.append(f"{node.type} '{node.id}' has a prompt of {len(text)} characters "
                                f"(at most {MAX_PROMPT_CHARS})")
    if not workflow.nodes:
        problems.append("workflow has no nodes and no globalPrompt to build one from")
        return problems
    starts = [n for n in workflow.nodes.values() if n.kind == "start"]
    if not starts:
        problems.append("no startNode")
    elif len(starts) > 1:
        problems.append("several startNodes: " + ", ".join(f"'{n.id}'" for n in starts))

    declared = {v.name for v in workflow.variables}
    for edge in workflow.edges:
        if edge.source not in workflow.nodes:
            problems.append(f"edge '{edge.id}' starts at unknown node '{edge.source}'")
        if edge.target not in workflow.nodes:
            problems.append(f"edge '{edge.id}' targets unknown node '{edge.target}'")
        problems.extend(_edge_condition_problems(edge, declared))

    for node in workflow.nodes.values():
        if node.kind == "conversation" and not node.prompt:
            problems.append(f"{node.type} '{node.id}' has no prompt")
        if node.audio is not None and not _is_web_url(node.audio.url):
            problems.append(f"{node.type} '{node.id}' audioUrl '{node.audio.url}' is not an http(s) URL "
                            "(Twilio fetches the recording from it)")
        if node.kind == "transfer":
            destination = node.destination
            if destination is None:
                problems.append(f"{node.type} '{node.id}' has no destination (an E.164 number such as +14155550100)")
            elif not E164_RE.fullmatch(destination):
                problems.append(f"{node.type} '{node.id}' destination '{destination}' is not a valid E.164 number")

    if len(starts) == 1:
        reachable = workflow.reachable_from(starts[0].id)
        for node in workflow.nodes.values():
            if node.kind == "end" and node.id not in reachable:
                problems.append(f"{node.type} '{node.id}' is unreachable from the start node")
            if node.id in reachable and not workflow.runnable(node):
                problems.append(
                    f"node '{node.id}' has type '{node.type}', which the engine cannot run, "
                    "and is reachable from the start node"
                )
    return problems


def workflow_warnings(workflow: Workflow) -> list[str]:
    """Non-fatal oddities worth showing to whoever built the flow."""
    warnings: list[str] = []
    starts = [n for n in workflow.nodes.values() if n.kind == "start"]
    reachable = workflow.reachable_from(starts[0].id) if len(starts) == 1 else set(workflow.nodes)
    for node in workflow.nodes.values():
        outgoing = workflow.outgoing(node.id)
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
    for spec in workflow.variables:
        if spec.type not in VARIABLE_TYPES:
            warnings.append(f"variable '{spec.name}' has unknown type '{spec.type}'; it is treated as a string")
        if spec.node_id not in (None, SYSTEM_NODE_ID) and spec.node_id not in workflow.nodes:
            warnings.append(f"variable '{spec.name}' belongs to unknown node '{spec.node_id}'; no step records it")
    return warnings


# An absolute http(s) URL with a host: what Twilio can fetch a recording from.
_WEB_URL_RE = re.compile(r"https?://[^\s/?#@]+(?:[/?#]\S*)?")


def _is_web_url(url: str) -> bool:
    return _WEB_URL_RE.fullmatch(url) is not None


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
