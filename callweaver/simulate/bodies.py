"""Request bodies in the web app's shapes, built from a Call Flow Weaver export (contract.md §2)."""
from __future__ import annotations

from typing import Any


def make_call_body(export: dict | None, to: str, **extra: Any) -> dict:
    """What PlaygroundModal.handleMakeCall posts to /api/make-call-optimized for this exported flow."""
    body: dict[str, Any] = {"to": to}
    if export:
        start = next((n for n in export.get("nodes", []) if n.get("type") == "startNode"), {"data": {}})
        body.update(workflowId=(export.get("config") or {}).get("id") or export.get("workflowId")
                    or export.get("name") or "workflow",
                    nodes=export.get("nodes"), edges=export.get("edges"), config=export.get("config"),
                    variables=export.get("variables", []),
                    globalPrompt=start.get("data", {}).get("globalPrompt", ""))
    body.update(extra)
    return body
