"""POST /api/chat: the web app's playground, served by the same provider chain (and failover) as calls."""
from __future__ import annotations

import time
from typing import Any
from datetime import datetime, timezone

from flask import Blueprint, jsonify

from ..errors import ApiError
from ..engine.playground import playground_messages
from ..engine.workflow import MAX_PROMPT_CHARS
from ..services import services
from .common import all_providers_failed, body_params

bp = Blueprint("chat", __name__)
ROLES = {"system", "user", "assistant"}
MAX_MESSAGES = 200  # a long playground conversation, with the app's evaluation requests, stays far below this


def validate_messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "Messages array is required")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(400, f"messages has {len(raw)} entries (at most {MAX_MESSAGES})")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] must be {{role: system|user|assistant, content: string}}")
        if len(m["content"]) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"messages[{i}].content has {len(m['content'])} characters "
                                f"(at most {MAX_PROMPT_CHARS})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@bp.post("/api/chat")
def chat():
    body = body_params()
    client_messages = validate_messages(body.get("messages"))
    global_prompt = body.get("globalPrompt")
    if isinstance(global_prompt, str) and len(global_prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"globalPrompt has {len(global_prompt)} characters (at most {MAX_PROMPT_CHARS})")
    # Ids that are not strings name no node or flow (a dict or list looked up among the node ids was a 500): the
    # reply goes on without them, as the original's did.
    node_id = body.get("currentNodeId") if isinstance(body.get("currentNodeId"), str) else None
    svc = services()
    # Each message is capped, and so is their sum: the request is open and every character is billed input.
    total = sum(len(m["content"]) for m in client_messages) + (len(global_prompt) if isinstance(global_prompt, str)
                                                                else 0)
    if total > svc.settings.chat_max_chars:
        raise ApiError(400, f"messages and globalPrompt have {total} characters "
                            f"(at most {svc.settings.chat_max_chars}, CHAT_MAX_CHARS)")
    workflow_id = body.get("workflowId") if isinstance(body.get("workflowId"), str) else None
    # A pinned id's flow is the operator's inbound line (its prompt, its transfer numbers): the public playground
    # reads it as an unknown id, or anyone who knew the id could ask the model to repeat it.
    readable = workflow_id and workflow_id not in svc.settings.pinned_workflow_ids
    stored = svc.store.get_workflow(workflow_id) if readable else None
    messages = playground_messages(client_messages, stored_workflow=stored, global_prompt=body.get("globalPrompt"),
                                   node_id=node_id)
    started = time.perf_counter()
    reply = svc.providers.complete(messages, temperature=0.7, max_tokens=1000)
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    if reply.apology_used:
        return all_providers_failed(reply.failovers)
    return jsonify(success=True, response=reply.text,
                   timestamp=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                   provider=reply.provider, latencyMs=latency_ms, providerTtftMs=reply.provider_ttft_ms,
                   failovers=reply.failovers)
