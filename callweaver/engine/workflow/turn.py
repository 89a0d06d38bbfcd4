"""One caller turn through the flow: the LLM request that carries the routing and recording tools, and its outcome.

`plan_turn` builds the turn's single LLM request; `apply_turn` reads the streamed reply's tool calls and moves the call.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass, replace as replace_fields
from typing import Any, Iterable, Iterator, Mapping

from ..speech import APOSTROPHES, ends_as_question, fold_chinese_script, is_cjk, is_thai, normalise_speech
from .conditions import coerce_variable, first_true_logical_edge, plain
from .model import PLACEHOLDER_RE, Edge, VariableSpec, Workflow

TRANSITION_TOOL = "transition"
RECORD_VARIABLES_TOOL = "record_variables"
PRESS_KEYS_TOOL = "press_keys"   # outbound calls: get through a phone menu (IVR) at the other end
_KEYS = re.compile(r"^[0-9*#w]{1,32}$")
DEFAULT_HISTORY_LIMIT = 20
_JSON_SCHEMA_TYPES = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean"}
_UNKNOWN_VALUE_TEXT = "(not known yet)"

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
    node_id = workflow.settle(state.current_node, state.variables)
    node = workflow.node(node_id)

    offered = [e for e in workflow.outgoing(node_id) if e.decided_by_llm and e.target in workflow.nodes]
    specs = workflow.variables_for(node_id)
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
                        for text in prompt_texts for name in PLACEHOLDER_RE.findall(text or "")}
    global_prompt, used = _fill_placeholders(workflow.global_prompt, state.variables)
    values_used |= used
    if global_prompt:
        sections.append(global_prompt)
    step_lines = [f"Current step: {node.label}"] if node.label else []
    for heading, text in (("", node.prompt), ("Instructions: ", node.instructions),
                          ("Objective: ", node.objective)):
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
    *,
    keypad: bool = False,
) -> TurnOutcome:
    """Interpret the streamed reply's tool calls: record variables, then a true logical edge, else `transition`, else stay.

    `reply_text` is what was spoken; routing never depends on it (it is accepted so callers pass the whole result).
    Arguments may be dicts or the raw JSON strings the API streams; malformed ones are ignored. Only what the turn
    offered counts (as in plan_turn): the step's own variables, and `press_keys` only with `keypad`; a model may
    call a tool or name a variable it was never given (a system variable that steers a logical edge).
    """
    node_id = workflow.settle(state.current_node, state.variables)
    workflow.node(node_id)  # an unknown node is a caller bug: fail loudly rather than stall the call
    offered_variables = {spec.name: spec for spec in workflow.variables_for(node_id)}
    variables = dict(state.variables)
    transition_ids: list[str] = []
    keys = ""
    for name, raw_args in tool_calls:
        args = _tool_arguments(raw_args)
        if name == RECORD_VARIABLES_TOOL:
            for var_name, value in args.items():
                spec = offered_variables.get(var_name)
                if spec is None or value is None:
                    continue
                fits, coerced = coerce_variable(spec, value)
                if fits:
                    variables[var_name] = coerced
        elif name == TRANSITION_TOOL and isinstance(args.get("edge_id"), str):
            transition_ids.append(args["edge_id"])
        elif (name == PRESS_KEYS_TOOL and keypad and isinstance(args.get("digits"), str)
              and _KEYS.match(args["digits"])):
            keys += args["digits"]

    outgoing = workflow.outgoing(node_id)
    via: str | None = None
    next_node = node_id
    logical = first_true_logical_edge(outgoing, variables)
    if logical is not None and logical.target in workflow.nodes:
        next_node, via = logical.target, f"logical:{logical.id}"
    else:
        offered = {e.id: e for e in outgoing if e.decided_by_llm and e.target in workflow.nodes}
        chosen = next((offered[i] for i in transition_ids if i in offered), None)
        if chosen is not None:
            next_node, via = chosen.target, chosen.id
    if via is not None:
        next_node = workflow.settle(next_node, variables)
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
    reachable = workflow.reachable_from(state.current_node) if state.current_node in workflow.nodes else set()
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
    "ok, that's all, thanks bye" ends the call. Phrases of scripts written without spaces (CJK, Thai) match as plain
    suffixes, a Thai one only where a word starts (see _thai_word_starts); Chinese matches in either script (再见 is
    再見) and before sentence-final particles the caller added (拜拜啦). A question ("bye?", 再见？, وداعا؟, αντίο;)
    is never a goodbye: the caller is checking, not leaving (speech.ends_as_question). A goodbye negated or only
    mentioned ("I never said goodbye", "before I say bye", 先别说再见, "non è tutto", "não é só isso") is none (see
    _mentioned and _negated), nor is a Japanese phrase said inside a sentence (三人以上です "three or more",
    ちょっと失礼します "excuse me a moment"; see _inside_japanese_sentence).
    """
    text = _goodbye_form(utterance)
    if not text:
        return False
    if ends_as_question(utterance):
        return False
    phrases_normalised = _termination_phrases(tuple(phrases))
    for candidate in _without_final_particles(text):
        for phrase, unspaced in phrases_normalised:
            if _ends_with_goodbye(candidate, phrase, unspaced) and not _negated(utterance, phrase, unspaced):
                return True
    return False


def _ends_with_goodbye(text: str, phrase: str, unspaced: bool) -> bool:
    """Whether `text` (in _goodbye_form) ends by saying one normalised goodbye phrase."""
    if unspaced:
        if not text.replace(" ", "").endswith(phrase):
            return False
        before = _before_last(text, len(phrase))
        if is_thai(phrase[0]) and not _thai_word_starts(before, phrase):
            return False
        if _inside_japanese_sentence(before, phrase) or _korean_directions(before, phrase):
            return False
        return not _mentioned(before, phrase)
    if text != phrase:
        if not text.endswith(phrase):
            return False
        before = text[-len(phrase) - 1]
        if before != " " and not is_cjk(before):  # a whole word: "goodbye" does not end with the word "bye"
            return False
    return not _mentioned(text[:-len(phrase)].rstrip(), phrase)


def _before_last(text: str, chars: int) -> str:
    """`text` before its last `chars` characters that are not spaces."""
    end = len(text)
    while chars:
        end -= 1
        chars -= text[end] != " "
    return text[:end]


# Chinese sentence-final particles (Cantonese 啦 喇 囉 咯 喎 呀 吖 嘞, Mandarin 了 吧 啊 哦 喔 嘛): "拜拜啦", "再见了" are
# goodbyes; a particle the caller added closes the sentence. A phrase's own particle stays part of it: 冇其他嘢喇
# ("nothing else", closing) is a goodbye, 仲有冇其他嘢呀 ("anything else?") is not.
_FINAL_PARTICLES = "啦喇囉咯喎呀吖啊嘞了吧哦喔嘛"
# Spellings of one particle (喇/啦 are both laa3, 囉/咯 both lo3): folded together for comparison.
_PARTICLE_SPELLINGS = str.maketrans("喇囉", "啦咯")


def _goodbye_form(text: str) -> str:
    """What goodbye matching compares: the words normalised, Chinese in one script and one particle spelling."""
    return fold_chinese_script(normalise_speech(text)).translate(_PARTICLE_SPELLINGS)


def _without_final_particles(text: str) -> Iterator[str]:
    """`text`, then `text` without its last sentence-final particle, then without the one before, ..."""
    while text:
        yield text
        text = text[:-1].rstrip() if text[-1] in _FINAL_PARTICLES else ""


# A goodbye negated or talked about rather than said, by what comes right before it: English (where "yet" usually
# follows, which the end-anchoring already handles, but "before I say bye", "I never said goodbye", "no need to say
# goodbye" end a sentence: a negation, "before I" or "without" right before say/said/saying), Chinese (Simplified, as
# _goodbye_form writes it; a space there is a clause break: 我没有，再见 is said), which puts the goodbye last:
# 先别说再见 "don't say goodbye yet", 我还没说再见, 唔好講拜拜, and Korean, which spaces words: 안 끊을게요 "I won't hang up".
_MENTIONED_IN_ENGLISH = re.compile(
    r"\b(?:dont|didnt|doesnt|not|never|havent|hasnt|hadnt|wont|cant|cannot|couldnt|wouldnt|shouldnt|no need to"
    r"|before (?:i|we|you)|without)"
    r"(?: (?:have|need|want|got) to)?(?: (?:even|ever|yet|have|be))? (?:say|said|saying)$")
_MENTIONED_IN_CHINESE = re.compile(r"(?:别|不要|不用|不想|没有?|还没有?|未|唔好|唔使|唔想)(?:说|讲|講|话)?$")
_MENTIONED_IN_KOREAN = re.compile(r"(?:^|\s)(?:안|못)\s*$")
# 拜拜 is also "to worship" (at a temple, at the family altar): 去拜拜, 在拜拜, 廟裡拜拜 are no goodbyes.
_WORSHIP_BAI_BAI = re.compile(r"(?:去|在|庙里?|廟里?)$")


def _mentioned(before: str, phrase: str) -> bool:
    """Whether the words before a goodbye phrase negate or mention it, or make it another word, instead of
    saying it."""
    return bool(_MENTIONED_IN_ENGLISH.search(before.rstrip()) or _MENTIONED_IN_CHINESE.search(before)
                or _MENTIONED_IN_KOREAN.search(before)
                or phrase.startswith("拜拜") and _WORSHIP_BAI_BAI.search(before))


# Negations that come right before a goodbye phrase, in languages that negate by a word in front ("non è tutto" is
# "that's not all", "não é só isso" "it's not only that", "bukan itu saja" "not only that", "ليس هذا كل شيء"). Only
# directly before it, in the same clause: "No, è tutto" and "Não, é só isso, obrigado" ("No, that's all") are
# goodbyes, which the recogniser's comma tells apart. A word that is also an interjection ("No") counts only before
# the words it negates, as recognisers often drop that comma: "no" in "no es todo" (English "no that's all" is a
# goodbye), "non" in "non è tutto" (French "non c'est tout" is one), "não" before a verb or "só" (not "não tchau"),
# "hindi"/"bukan" before "that" or "only" (not "hindi paalam"). Arabic's words here are negations only.
# Languages that negate inside the phrase ("eso no es todo", "c'est pas tout", "это не всё", "to nije sve") or after
# it (Japanese, Turkish, Hindi) need nothing here: the phrase is not the end of what they said.
_NAO = frozenset({"é", "e", "era", "foi", "só", "so"})  # Portuguese "não é tudo", "não só isso"
_NEGATIONS_BEFORE: Mapping[str, frozenset[str] | None] = {
    "non": frozenset({"è", "e", "basta"}),  # Italian "non è tutto"; French "non c'est tout" stays a goodbye
    "não": _NAO, "nao": _NAO,               # Portuguese (a recogniser may drop the tilde)
    "no": frozenset({"es", "era", "fue"}),  # Spanish "no es todo"; English "no, that's all" stays a goodbye
    "bukan": frozenset({"itu", "ini", "cuma", "hanya"}),  # Indonesian, Malay "bukan itu saja"
    "hindi": frozenset({"yun", "iyon", "ito", "lang"}),   # Filipino "hindi yun lang"
    "ليس": None, "ليست": None, "مش": None, "مو": None,  # Arabic: Modern Standard, Egyptian/Levantine, Gulf
}
# "is" between a negation and a phrase that starts after it: pt-BR "só isso, obrigado" in "não é só isso, obrigado".
_COPULAS_AFTER_NEGATION = frozenset({"é", "e", "è", "es"})
# A clause break kept as a word while looking for a negation: a letter no language of the table writes.
_CLAUSE_BREAK = "\u01c1"


def _clause_marked(utterance: str) -> list[str]:
    """The words of `utterance` in _goodbye_form, with _CLAUSE_BREAK where it had punctuation."""
    marked = "".join(f" {_CLAUSE_BREAK} " if unicodedata.category(char)[0] == "P" and char not in APOSTROPHES
                     else char for char in utterance)
    return _goodbye_form(marked).split()


def _negated(utterance: str, phrase: str, unspaced: bool) -> bool:
    """Whether the word right before a (spaced) goodbye phrase that ends `utterance`, in the same clause, negates
    it (_NEGATIONS_BEFORE)."""
    if unspaced:
        return False
    words = _clause_marked(utterance)
    while words and words[-1] == _CLAUSE_BREAK:
        words.pop()
    phrase_words = phrase.split()
    left = len(phrase_words)
    while words and left:  # the phrase's own words (and any clause break inside it: "grazie, ciao")
        left -= words.pop() != _CLAUSE_BREAK
    following = phrase_words[0]
    if len(words) > 1 and words[-1] in _COPULAS_AFTER_NEGATION:  # "não é | só isso, obrigado"
        following = words.pop()
    if left or not words:
        return False
    word = words[-1]
    if word not in _NEGATIONS_BEFORE:
        return False
    negates = _NEGATIONS_BEFORE[word]
    return negates is None or following in negates


# Japanese says some closing phrases inside sentences too: 以上です ("that's all") is also "... or more" (三人以上です
# "three people or more"), 失礼します ("goodbye") also "excuse me" (ちょっと失礼します "excuse me a moment", said before
# stepping away). A phrase beginning with 以上 closes only at the start of what was said, after a clause break (not
# one after a quantity: see _JAPANESE_QUANTITY), or after a word that leads into a closing (はい、では、これで, a
# topic 私からは) or a finished polite sentence, whose 。 the recogniser may leave out (ありがとうございます以上です);
# one beginning with 失礼 never after a word of "a moment".
_JAPANESE_CLOSING_LEAD_INS = ("はい", "では", "じゃあ", "じゃ", "それでは", "それじゃ", "これで", "ええ", "うん", "は",
                              "です", "ます", "でした", "ました", "ません")
# A quantity that 以上 makes "... or more": a number with its counter or unit (三人, 1万円, 二つ, 5メートル, 半分), or
# "that" (それ以上 "more than that").
_JAPANESE_QUANTITY = re.compile(r"(?:[0-9０-９〇一二三四五六七八九十百千万億半]\S{0,4}|それ|これ|あれ)$")
_JAPANESE_A_MOMENT = re.compile(r"(?:ちょっと|ちょっとだけ|少々|少し|一旦|いったん|一度)$")


def _inside_japanese_sentence(before: str, phrase: str) -> bool:
    """Whether a Japanese closing phrase found after `before` is part of a sentence rather than a closing."""
    if phrase.startswith("以上"):
        said = before.replace(" ", "")
        if not said or said.endswith(_JAPANESE_CLOSING_LEAD_INS):
            return False
        # after a break (a pause, a comma, or a space the recogniser put between words), unless what comes before
        # is a quantity: 三人 以上です is "three or more" however it was spaced
        return not before.endswith(" ") or bool(_JAPANESE_QUANTITY.search(said))
    if phrase.startswith("失礼"):
        return bool(_JAPANESE_A_MOMENT.search(before.rstrip()))
    return False


# Korean 들어가세요 is "goodbye" (literally "go in", home, safely) but also a direction: 안으로 들어가세요 "go inside",
# 홈페이지에 들어가세요 "go to the website". After a place (a word ending in the particles 에, 로/으로, 에서, or 안/속
# "inside") it is a direction, not a goodbye.
_KOREAN_PLACE_BEFORE = re.compile(r"(?:에|로|에서|안|속)\s*$")


def _korean_directions(before: str, phrase: str) -> bool:
    """Whether a Korean 들어가세요 found after `before` gives directions rather than says goodbye."""
    return phrase.startswith("들어가") and bool(_KOREAN_PLACE_BEFORE.search(before))


# Thai writes no spaces between words, so a goodbye usually ends an unspaced run ("ขอบคุณครับบาย"); but a phrase also
# ends longer words and sentences: บาย ends ไม่สบาย ("unwell"), แค่นี้ครับ ("that's all") ends มีแค่นี้ครับ ("I only
# have this much"). An unspaced Thai phrase is a goodbye when it starts the utterance or follows a space, a polite
# particle or one of the words that lead into a goodbye (thanks, OK, เอา "take", ก็/งั้น "so"), or when the phrase
# starts with a polite particle itself (ครับ บาย); a one-syllable phrase needs a space before it.
_SHORTEST_UNSPACED_THAI_PHRASE = 4
_THAI_POLITE_PARTICLES = ("ครับ", "ค่ะ", "คะ", "นะ", "จ้ะ", "จ้า")
_THAI_GOODBYE_LEAD_INS = _THAI_POLITE_PARTICLES + ("ขอบคุณ", "โอเค", "เอา", "ก็", "งั้น")


def _thai_word_starts(before: str, phrase: str) -> bool:
    """Whether an unspaced Thai goodbye phrase found after `before` starts a word there (see above)."""
    return (not before or before.endswith(" ") or before.endswith(_THAI_GOODBYE_LEAD_INS)
            or phrase.startswith(_THAI_POLITE_PARTICLES))


def _unspaced(phrase: str) -> bool:
    """Whether a (normalised) goodbye phrase matches as a plain suffix of the utterance with spaces removed."""
    if any(is_cjk(ch) for ch in phrase):
        return True
    compact = phrase.replace(" ", "")
    return any(is_thai(ch) for ch in compact) and len(compact) >= _SHORTEST_UNSPACED_THAI_PHRASE


@functools.lru_cache(maxsize=256)
def _termination_phrases(phrases: tuple[str, ...]) -> tuple[tuple[str, bool], ...]:
    """A language's goodbye phrases normalised once (every turn checks them): (phrase, unspaced), unspaced ones
    compacted."""
    normalised = []
    for raw_phrase in phrases:
        phrase = _goodbye_form(raw_phrase)
        if not phrase:
            continue
        unspaced = _unspaced(phrase)
        normalised.append((phrase.replace(" ", "") if unspaced else phrase, unspaced))
    return tuple(normalised)


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
        return plain(value)

    return PLACEHOLDER_RE.sub(replace, text), used
