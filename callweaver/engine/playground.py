"""The web app's playground chat: its own conversation, our system prompt in front, one LLM request."""
from __future__ import annotations

from typing import Any

from .workflow import Workflow

DEFAULT_SYSTEM_PROMPT = ("You are a helpful AI voice assistant on a phone call. Keep replies short, natural and "
                         "conversational.")


def playground_messages(client_messages: list[dict[str, str]], *, stored_workflow: dict | None,
                        global_prompt: str | None, node_id: str | None) -> list[dict[str, str]]:
    """System prompt = stored workflow's global prompt ‖ the body's ‖ default, plus the current node's prompt;
    then the client's messages verbatim (the app parses YES/NO out of its own evaluation prompts)."""
    workflow = Workflow.from_snapshot(stored_workflow) if stored_workflow else None
    system = (workflow.global_prompt if workflow and workflow.global_prompt else None) or \
        (global_prompt.strip() if isinstance(global_prompt, str) and global_prompt.strip() else DEFAULT_SYSTEM_PROMPT)
    if workflow and node_id and node_id in workflow.nodes:
        node = workflow.nodes[node_id]
        parts = [p for p in (node.prompt, node.instructions) if p]
        if parts:
            system += f"\n\nCurrent step ({node.label or node.id}):\n" + "\n".join(parts)
    return [{"role": "system", "content": system}, *client_messages]
