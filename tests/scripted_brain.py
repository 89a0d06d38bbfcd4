"""A scripted LLM 'brain' for the fake LLM: answers like a model that follows our tool instructions."""
from __future__ import annotations

from tests.fakes.fake_llm import Reply

# caller phrase (lower-case substring) → (reply text, edge to take or None)
REAL_ESTATE_SCRIPT = {
    "buy": ("Wonderful, let's find you a home. What kind of property are you looking for?", "edge_2"),
    "sell": ("Happy to help you sell. Tell me about your property.", "edge_3"),
    "rent": ("Sure, let's talk about rentals. What are you looking for?", "edge_4"),
    "invest": ("Great, let's talk investment goals.", "edge_5"),
    "three bedroom": ("Got it, a three bedroom house. Noted.", "edge_6"),
    "condo downtown": ("A downtown condo, noted.", "edge_7"),
    "apartment": ("An apartment rental, noted.", "edge_8"),
    "my name is": ("Thanks, I have your contact details.", "edge_10"),
    "human": ("Of course.", "edge_11"),
    "that's everything": ("Perfect, I have all I need.", "edge_12"),
}


def last_user_text(body: dict) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def offered_edges(body: dict) -> set[str]:
    for tool in body.get("tools") or []:
        fn = tool.get("function", {})
        if fn.get("name") == "transition":
            return set(fn["parameters"]["properties"]["edge_id"].get("enum", []))
    return set()


def real_estate_brain(body: dict) -> Reply:
    text = last_user_text(body).lower()
    for phrase, (reply, edge) in REAL_ESTATE_SCRIPT.items():
        if phrase in text:
            if edge and edge in offered_edges(body):
                return Reply(text=reply, tool_calls=[("transition", {"edge_id": edge})])
            return Reply(text=reply)
    return Reply(text="I see. Could you tell me a bit more?")
