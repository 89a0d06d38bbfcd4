"""languages.json may only name voices, providers and speech models Twilio lists for ConversationRelay.

The lists are kept, with their sources and the date they were read, in callweaver/engine/relay_voice_lists.json.
Twilio drops a call whose TwiML names an unknown voice or provider/model pair, so this fails before a call does.
"""
from __future__ import annotations

import json
import re

import pytest

from callweaver.engine.languages import (DEFAULT_TABLE_PATH, VOICE_LISTS_PATH, amazon_tts_locale,
                                         deepgram_language_key, google_tts_locale, primary_subtag)

LISTS = json.loads(VOICE_LISTS_PATH.read_text(encoding="utf-8"))
TABLE = json.loads(DEFAULT_TABLE_PATH.read_text(encoding="utf-8"))["languages"]
GOOGLE_VOICE = re.compile(r"^(?P<locale>[a-z]{2,3}-[A-Z]{2})-(?P<type>[A-Za-z0-9]+(-HD)?)-(?P<name>[A-Za-z]+)$")


def unlisted(code: str, relay: dict, lists: dict = LISTS) -> list[str]:
    """What a relay configuration names that the published lists do not."""
    problems = []
    tts, voice = relay["ttsProvider"], relay["voice"]
    if tts not in lists["tts"]:
        problems.append(f"TTS provider {tts}")
    elif tts == "Google":
        match = GOOGLE_VOICE.match(voice)
        types = lists["tts"]["Google"]["voiceTypesByLocale"].get(match["locale"] if match else "", [])
        if not match or match["locale"] != google_tts_locale(code) or match["type"] not in types:
            problems.append(f"Google voice {voice}")
        elif match["type"] == "Chirp3-HD" and match["name"] not in lists["tts"]["Google"]["chirp3HdVoiceNames"]:
            problems.append(f"Chirp3-HD voice name {match['name']}")
    elif tts == "Amazon":
        names = lists["tts"]["Amazon"]["neuralVoicesByLocale"].get(amazon_tts_locale(code), [])
        if voice.removesuffix("-Neural") not in names:
            problems.append(f"Amazon voice {voice}")
    elif tts == "ElevenLabs":
        listing = lists["tts"]["ElevenLabs"]
        if primary_subtag(code) not in listing["languages"] or code in listing["excludedCodes"]:
            problems.append(f"ElevenLabs language {code}")
    stt, model = relay["transcriptionProvider"], relay["speechModel"]
    models = lists["stt"].get(stt, {}).get("models", {})
    if model not in models:
        problems.append(f"speech model {stt}/{model}")
    elif stt == "Deepgram" and deepgram_language_key(code) not in models[model]:
        problems.append(f"Deepgram {model} language {code}")
    return problems


def test_the_lists_say_where_they_come_from_and_when():
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", LISTS["retrieved"])
    assert LISTS["sources"] and all(s["url"].startswith("https://") and s["dated"] and s["what"]
                                    for s in LISTS["sources"])
    assert any("twilio.com/docs/voice/conversationrelay/voice-configuration" in s["url"] for s in LISTS["sources"])


@pytest.mark.parametrize("entry", TABLE, ids=[e["code"] for e in TABLE])
def test_every_language_names_only_listed_voices_and_speech_models(entry):
    assert unlisted(entry["code"], entry["relay"]) == []


@pytest.mark.parametrize("change, expected", [
    ({"voice": "en-US-Chirp3-HD-Bogus"}, "Chirp3-HD voice name Bogus"),
    ({"voice": "en-US-Studio-Q"}, "Google voice en-US-Studio-Q"),
    ({"ttsProvider": "Amazon", "voice": "Hiujin-Neural"}, "Amazon voice Hiujin-Neural"),
    ({"ttsProvider": "Azure"}, "TTS provider Azure"),
    ({"speechModel": "nova-4-general"}, "speech model Deepgram/nova-4-general"),
    ({"transcriptionProvider": "Google", "speechModel": "long"}, "speech model Google/long"),
])
def test_a_table_naming_something_twilio_does_not_list_fails(change, expected):
    relay = {**next(e for e in TABLE if e["code"] == "en-US")["relay"], **change}
    assert expected in unlisted("en-US", relay)


def test_an_unlisted_deepgram_language_fails():
    relay = {"ttsProvider": "Google", "voice": "is-IS-Standard-A", "transcriptionProvider": "Deepgram",
             "speechModel": "nova-3-general"}
    assert unlisted("is-IS", relay) == ["Deepgram nova-3-general language is-IS"]
