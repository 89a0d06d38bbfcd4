"""Tests for the call-flow workflow model: parsing, validation, snapshots, turn planning and stepping."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest

from callweaver.engine import workflow as workflow_module
from callweaver.engine.speech import MAX_TURN_REPLY_BYTES
from callweaver.engine.workflow.parse import MAX_TURN_TOKENS
from callweaver.engine.workflow import (
    RECORD_VARIABLES_TOOL,
    TRANSITION_TOOL,
    ConversationState,
    LogicalCondition,
    VariableSpec,
    Workflow,
    WorkflowError,
    apply_turn,
    coerce_variable,
    conditions_hold,
    detect_termination,
    plan_turn,
    termination_outcome,
)

FIXTURES = Path(__file__).parent / "fixtures" / "workflows"
GOODBYE_PHRASES = ["bye", "goodbye", "that's all", "拜拜", "再見"]


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture
def real_estate_payload() -> dict:
    return load_fixture("real_estate_property_dealer.json")


@pytest.fixture
def real_estate(real_estate_payload) -> Workflow:
    return Workflow.from_payload(real_estate_payload)


@pytest.fixture
def loan() -> Workflow:
    return Workflow.from_payload(load_fixture("loan_prequalification_logical.json"))


@pytest.fixture
def clinic() -> Workflow:
    return Workflow.from_payload(load_fixture("clinic_cantonese_transfer.json"))


@pytest.fixture
def minimal() -> Workflow:
    return Workflow.from_payload(load_fixture("minimal_faq.json"))


def state_at(node_id: str, variables: dict | None = None, messages: list | None = None) -> ConversationState:
    return ConversationState(current_node=node_id, variables=dict(variables or {}), messages=list(messages or []))


def tool_named(plan, name: str) -> dict | None:
    return next((t for t in plan.tools or [] if t["function"]["name"] == name), None)


def node_data(payload: dict, node_id: str) -> dict:
    return next(n for n in payload["nodes"] if n["id"] == node_id)["data"]


def edge_entry(payload: dict, edge_id: str) -> dict:
    return next(e for e in payload["edges"] if e["id"] == edge_id)


# --------------------------------------------------------------------------- parsing the real export


def test_real_estate_fixture_parses_node_kinds_and_edges(real_estate):
    kinds = {node_id: node.kind for node_id, node in real_estate.nodes.items()}
    assert kinds["start_node"] == "start"
    assert kinds["inquiry_type_node"] == "conversation"
    assert kinds["transfer_to_agent_node"] == "transfer"
    assert kinds["end_call_node"] == "end"
    assert sum(kind == "conversation" for kind in kinds.values()) == 7
    assert len(real_estate.edges) == 12

    edge_2 = next(e for e in real_estate.edges if e.id == "edge_2")
    assert (edge_2.source, edge_2.target, edge_2.kind) == ("inquiry_type_node", "buyer_requirements_node", "ai_based")
    assert edge_2.ai_condition == "Customer wants to buy a property"
    assert edge_2.description == "Route to buyer requirements if customer is looking to purchase"
    edge_1 = next(e for e in real_estate.edges if e.id == "edge_1")
    assert edge_1.kind == "none" and edge_1.is_default

    transfer = real_estate.nodes["transfer_to_agent_node"]
    assert transfer.destination == "+1234567890"
    assert transfer.transfer_message.startswith("Transferring to specialist agent")
    assert real_estate.nodes["end_call_node"].end_message.startswith("Thank you for choosing Premier Properties")
    assert real_estate.nodes["inquiry_type_node"].label == "Inquiry Type Classification"


def test_real_estate_fixture_is_valid_and_its_null_variable_entry_is_ignored(real_estate):
    assert real_estate.problems() == []
    real_estate.validate()
    assert real_estate.variables == ()


def test_real_estate_entry_node_is_inquiry_type_node(real_estate):
    assert real_estate.start_node.id == "start_node"
    assert real_estate.entry_node_id() == "inquiry_type_node"


def test_real_estate_greeting_language_prompt_and_llm_options(real_estate):
    assert real_estate.greeting.startswith("Hello! Thank you for calling Premier Properties.")
    assert real_estate.default_language == "en-US"
    assert real_estate.global_prompt.startswith("You are a professional real estate AI assistant for Premier Properties.")
    assert real_estate.llm_options == {"temperature": 0.7, "max_tokens": 1000, "model": "gpt-4o-mini"}
    assert real_estate.name == "Real Estate Property Dealer Workflow"


def test_a_max_tokens_larger_than_any_turn_can_use_is_capped(real_estate_payload):
    """A flow's `maxTokens` went to the provider as written: 100000 is above every chat model's output limit
    (gpt-4o 16384, gpt-35-turbo 4096), so every turn of the call got a 400 and the caller heard only apologies. A turn
    never speaks more than MAX_TURN_REPLY_BYTES (each token is at least one byte), so a larger value is capped to
    one every model takes, without changing what any reply can say."""
    payload = copy.deepcopy(real_estate_payload)
    for value, expected in ((100000, MAX_TURN_TOKENS), (MAX_TURN_TOKENS, MAX_TURN_TOKENS), (300, 300)):
        payload["config"]["llm"]["azure"]["maxTokens"] = value
        assert Workflow.from_payload(payload).llm_options["max_tokens"] == expected
    assert MAX_TURN_TOKENS >= MAX_TURN_REPLY_BYTES


def test_version_hash_is_stable_and_ignores_canvas_layout(real_estate_payload):
    first = Workflow.from_payload(real_estate_payload).version_hash
    moved = copy.deepcopy(real_estate_payload)
    for node in moved["nodes"]:
        node["position"] = {"x": 1, "y": 2}
        node["selected"] = True
    assert Workflow.from_payload(copy.deepcopy(real_estate_payload)).version_hash == first
    assert Workflow.from_payload(moved).version_hash == first
    assert len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        lambda p: node_data(p, "inquiry_type_node").update(prompt="Ask what they need."),
        lambda p: node_data(p, "start_node").update(firstMessage="Hi there!"),
        lambda p: node_data(p, "end_call_node").update(endMessage="Bye now."),
        lambda p: node_data(p, "transfer_to_agent_node").update(destination="+14155550100"),
        lambda p: edge_entry(p, "edge_2")["data"].update(aiCondition="Customer wants a house"),
        lambda p: edge_entry(p, "edge_3").update(target="rental_requirements_node"),
        lambda p: p["edges"].pop(),
    ],
    ids=["node-prompt", "first-message", "end-message", "destination", "ai-condition", "edge-target", "edge-removed"],
)
def test_version_hash_changes_when_prompts_edges_or_messages_change(real_estate_payload, change):
    before = Workflow.from_payload(real_estate_payload).version_hash
    changed = copy.deepcopy(real_estate_payload)
    change(changed)
    assert Workflow.from_payload(changed).version_hash != before


def test_make_call_body_from_the_web_app_gives_the_same_workflow_as_the_export(real_estate_payload):
    start = node_data(real_estate_payload, "start_node")
    body = {
        "to": "+14155550199", "from": "+15005550006", "workflowId": "wf_1",
        "nodes": real_estate_payload["nodes"], "edges": real_estate_payload["edges"],
        "globalPrompt": start["globalPrompt"], "config": real_estate_payload["config"],
        "twilioAccountSid": "AC" + "0" * 32, "twilioAuthToken": "x" * 32,
    }
    from_body = Workflow.from_payload(body)
    assert from_body.version_hash == Workflow.from_payload(real_estate_payload).version_hash
    assert "x" * 32 not in json.dumps(from_body.to_snapshot())


def test_global_prompt_prefers_body_then_start_node_then_config_system_prompt(real_estate_payload):
    body = copy.deepcopy(real_estate_payload)
    body["globalPrompt"] = "Body prompt wins."
    assert Workflow.from_payload(body).global_prompt == "Body prompt wins."

    no_start_prompt = copy.deepcopy(real_estate_payload)
    del node_data(no_start_prompt, "start_node")["globalPrompt"]
    assert Workflow.from_payload(no_start_prompt).global_prompt.startswith(
        "You are a professional real estate agent assistant."
    )

    del no_start_prompt["config"]["llm"]["azure"]["systemPrompt"]
    assert Workflow.from_payload(no_start_prompt).global_prompt == ""


def test_body_with_only_a_global_prompt_runs_as_a_two_step_workflow():
    workflow = Workflow.from_payload({"workflowId": "w1", "globalPrompt": "You sell tickets for the City Zoo."})
    workflow.validate()
    entry = workflow.entry_node_id()
    assert workflow.nodes[entry].kind == "conversation"
    assert workflow.greeting is None
    assert workflow.default_language == "en-US"
    plan = plan_turn(workflow, state_at(entry), "How much is a ticket?")
    assert plan.system_prompt.startswith("You sell tickets for the City Zoo.")
    assert plan.tools is None
    assert plan.messages[-1] == {"role": "user", "content": "How much is a ticket?"}


def test_body_without_nodes_or_global_prompt_is_a_precise_problem():
    workflow = Workflow.from_payload({"to": "+14155550199"})
    assert workflow.problems() == ["workflow has no nodes and no globalPrompt to build one from"]
    with pytest.raises(WorkflowError):
        workflow.validate()


def test_body_language_is_used_when_config_names_none():
    workflow = Workflow.from_payload({"globalPrompt": "Hi", "language": "zh-HK"})
    assert workflow.default_language == "zh-HK"
    assert Workflow.from_snapshot(workflow.to_snapshot()).default_language == "zh-HK"


def test_clinic_fixture_reads_cantonese_and_normalises_the_transfer_number(clinic):
    assert clinic.problems() == []
    assert clinic.default_language == "zh-HK"
    assert clinic.greeting == "你好，呢度係康健診所。請問有咩可以幫到你？"
    assert clinic.nodes["nurse_transfer"].destination == "+85223456789"


def test_payload_that_is_not_an_object_is_rejected():
    with pytest.raises(WorkflowError) as error:
        Workflow.from_payload(["not", "a", "workflow"])
    assert error.value.problems == ["workflow payload must be a JSON object"]


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_every_fixture_workflow_is_valid(name):
    Workflow.from_payload(load_fixture(name)).validate()


# --------------------------------------------------------------------------- snapshots


def test_snapshot_round_trips_exactly_and_survives_json(real_estate):
    snapshot = real_estate.to_snapshot()
    through_json = json.loads(json.dumps(snapshot))
    restored = Workflow.from_snapshot(through_json)
    assert restored.to_snapshot() == snapshot
    assert restored.version_hash == real_estate.version_hash
    assert restored.entry_node_id() == "inquiry_type_node"
    assert restored.llm_options == real_estate.llm_options


def test_snapshot_strips_every_secret_but_keeps_settings(real_estate_payload):
    payload = copy.deepcopy(real_estate_payload)
    payload["config"]["twilio"]["authToken"] = "tok_live_should_vanish"
    payload["config"]["llm"]["openai"] = {"api_key": "sk-should-vanish", "clientSecret": "s3cret", "password": "pw"}
    node_data(payload, "start_node")["authToken"] = "node_token_should_vanish"
    snapshot_text = json.dumps(Workflow.from_payload(payload).to_snapshot())
    for secret in ("YOUR_API_KEY", "tok_live_should_vanish", "sk-should-vanish", "s3cret", "node_token_should_vanish"):
        assert secret not in snapshot_text
    for key in ('"apiKey"', '"authToken"', '"api_key"', '"clientSecret"', '"password"'):
        assert key not in snapshot_text
    # maxTokens is a setting, not a token
    assert Workflow.from_snapshot(json.loads(snapshot_text)).llm_options["max_tokens"] == 1000
    assert '"phoneNumber": "+15005550006"' in snapshot_text


def test_loan_snapshot_round_trips_logical_conditions_and_variables(loan):
    snapshot = json.loads(json.dumps(loan.to_snapshot()))
    restored = Workflow.from_snapshot(snapshot)
    assert restored.to_snapshot() == snapshot
    assert restored.edges == loan.edges
    assert restored.variables == loan.variables
    assert "sk-test-not-a-real-key" not in json.dumps(snapshot)


def test_from_snapshot_rejects_a_raw_export(real_estate_payload):
    with pytest.raises(WorkflowError):
        Workflow.from_snapshot(real_estate_payload)


# --------------------------------------------------------------------------- validation


def _break_unknown_target(p):
    edge_entry(p, "edge_9")["target"] = "nope"


def _break_unknown_source(p):
    edge_entry(p, "edge_9")["source"] = "ghost"


def _break_no_start(p):
    p["nodes"] = [n for n in p["nodes"] if n["type"] != "startNode"]


def _break_two_starts(p):
    p["nodes"].append({"id": "start_2", "type": "startNode", "data": {"label": "Again"}})


def _break_missing_prompt(p):
    del node_data(p, "buyer_requirements_node")["prompt"]


def _break_bad_destination(p):
    node_data(p, "transfer_to_agent_node")["destination"] = "12345"


def _break_no_destination(p):
    del node_data(p, "transfer_to_agent_node")["destination"]


def _break_audio_url_scheme(p):
    node_data(p, "end_call_node")["audioUrl"] = "ftp://media.example.com/goodbye.wav"


def _break_audio_url_not_a_url(p):
    node_data(p, "buyer_requirements_node")["audioUrl"] = "goodbye.wav"


def _break_ai_without_condition(p):
    del edge_entry(p, "edge_3")["data"]["aiCondition"]


def _break_unknown_operator(p):
    p["variables"] = [{"name": "budget", "type": "number", "nodeId": "buyer_requirements_node"}]
    edge_entry(p, "edge_6")["data"] = {
        "type": "logical", "logicalConditions": [{"variable": "budget", "operator": "like", "value": 5}]}


def _break_undeclared_variable(p):
    edge_entry(p, "edge_6")["data"] = {
        "type": "logical", "logicalConditions": [{"variable": "budget", "operator": ">", "value": 5}]}


def _break_unreachable_end(p):
    p["edges"] = [e for e in p["edges"] if e["id"] != "edge_12"]


def _break_tool_on_path(p):
    p["nodes"].append({"id": "crm_lookup", "type": "apiRequest", "data": {"label": "CRM", "url": "https://crm.invalid"}})
    edge_entry(p, "edge_10")["target"] = "crm_lookup"
    p["edges"].append({"id": "edge_crm", "source": "crm_lookup", "target": "summary_confirmation_node",
                       "data": {"type": "none"}})


def _break_duplicate_node(p):
    p["nodes"].append(copy.deepcopy(p["nodes"][1]))


def _break_unknown_edge_type(p):
    edge_entry(p, "edge_2")["data"]["type"] = "fuzzy"


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (_break_unknown_target, "edge 'edge_9' targets unknown node 'nope'"),
        (_break_unknown_source, "edge 'edge_9' starts at unknown node 'ghost'"),
        (_break_no_start, "no startNode"),
        (_break_two_starts, "several startNodes: 'start_node', 'start_2'"),
        (_break_missing_prompt, "conversationNode 'buyer_requirements_node' has no prompt"),
        (_break_bad_destination, "transferCall 'transfer_to_agent_node' destination '12345' is not a valid E.164 number"),
        (_break_no_destination,
         "transferCall 'transfer_to_agent_node' has no destination (an E.164 number such as +14155550100)"),
        (_break_audio_url_scheme, "endCall 'end_call_node' audioUrl 'ftp://media.example.com/goodbye.wav' is not "
                                  "an http(s) URL (Twilio fetches the recording from it)"),
        (_break_audio_url_not_a_url, "conversationNode 'buyer_requirements_node' audioUrl 'goodbye.wav' is not "
                                     "an http(s) URL (Twilio fetches the recording from it)"),
        (_break_ai_without_condition, "ai_based edge 'edge_3' has no aiCondition"),
        (_break_unknown_operator,
         "edge 'edge_6' condition 1 uses unknown operator 'like' (expected one of == != > < >= <= contains not_contains)"),
        (_break_undeclared_variable, "edge 'edge_6' condition 1 uses undeclared variable 'budget'"),
        (_break_unreachable_end, "endCall 'end_call_node' is unreachable from the start node"),
        (_break_tool_on_path,
         "node 'crm_lookup' has type 'apiRequest', which the engine cannot run, and is reachable from the start node"),
        (_break_duplicate_node, "duplicate node id 'inquiry_type_node'"),
        (_break_unknown_edge_type,
         "edge 'edge_2' has unknown condition type 'fuzzy' (expected one of none, ai_based, logical, combined)"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_broken_workflow_reports_a_precise_problem(real_estate_payload, breakage, expected):
    broken = copy.deepcopy(real_estate_payload)
    breakage(broken)
    workflow = Workflow.from_payload(broken)
    assert expected in workflow.problems()
    with pytest.raises(WorkflowError) as error:
        workflow.validate()
    assert expected in error.value.problems
    assert expected in str(error.value)


def test_an_https_audio_url_is_valid_and_survives_the_snapshot(real_estate_payload):
    payload = copy.deepcopy(real_estate_payload)
    node_data(payload, "end_call_node").update(audioUrl="https://media.example.com/goodbye.wav",
                                               audioInterruptible=False)
    workflow = Workflow.from_payload(payload)
    assert workflow.problems() == []
    audio = workflow.nodes["end_call_node"].audio
    assert (audio.url, audio.interruptible) == ("https://media.example.com/goodbye.wav", False)
    assert Workflow.from_snapshot(workflow.to_snapshot()).nodes["end_call_node"].audio == audio
    assert workflow.nodes["inquiry_type_node"].audio is None


def test_validate_lists_every_problem_at_once(real_estate_payload):
    broken = copy.deepcopy(real_estate_payload)
    _break_unknown_target(broken)
    _break_missing_prompt(broken)
    _break_bad_destination(broken)
    with pytest.raises(WorkflowError) as error:
        Workflow.from_payload(broken).validate()
    assert len(error.value.problems) >= 3


def test_workflow_error_is_a_value_error():
    assert issubclass(WorkflowError, ValueError)


def test_warnings_name_unreachable_nodes_and_dead_end_conversations(real_estate_payload):
    payload = copy.deepcopy(real_estate_payload)
    payload["nodes"].append({"id": "orphan", "type": "conversationNode", "data": {"label": "Orphan", "prompt": "Hi"}})
    workflow = Workflow.from_payload(payload)
    assert workflow.problems() == []
    warnings = workflow.warnings()
    assert "node 'orphan' (conversationNode) is unreachable from the start node" in warnings
    assert ("conversationNode 'orphan' has no outgoing edge: the call stays there until the caller says goodbye"
            in warnings)


# --------------------------------------------------------------------------- plan_turn


def test_plan_turn_at_inquiry_node_offers_the_four_ai_edges_with_their_conditions(real_estate):
    plan = plan_turn(real_estate, state_at("inquiry_type_node"), "I'm thinking of buying a flat")
    assert plan.node_id == "inquiry_type_node"
    assert [t["function"]["name"] for t in plan.tools] == [TRANSITION_TOOL]
    transition = tool_named(plan, TRANSITION_TOOL)["function"]
    assert transition["parameters"]["properties"]["edge_id"]["enum"] == ["edge_2", "edge_3", "edge_4", "edge_5"]
    assert transition["parameters"]["required"] == ["edge_id"]
    for condition in ("Customer wants to buy a property", "Customer wants to sell a property",
                      "Customer is interested in rental (renting or renting out)",
                      "Customer is interested in property investment"):
        assert condition in transition["description"]
    assert "edge_2: Customer wants to buy a property" in transition["description"]


def test_plan_turn_describes_an_unconditional_edge_as_the_step_goal_being_complete(real_estate):
    plan = plan_turn(real_estate, state_at("buyer_requirements_node"), "Three bedrooms, please")
    transition = tool_named(plan, TRANSITION_TOOL)["function"]
    assert transition["parameters"]["properties"]["edge_id"]["enum"] == ["edge_6"]
    assert "edge_6: the goal of this step is complete" in transition["description"]


def test_plan_turn_has_no_tools_where_nothing_is_decided(minimal):
    plan = plan_turn(minimal, state_at("faq_node"), "When are you open?")
    assert plan.tools is None
    assert "call a tool" not in plan.system_prompt
    assert plan.cacheable is True


def test_plan_turn_system_prompt_layers_global_node_language_and_phone_guidance(real_estate):
    plan = plan_turn(real_estate, state_at("inquiry_type_node"), "hi",
                     language_instruction="Reply in English (United States).")
    prompt = plan.system_prompt
    assert plan.messages[0] == {"role": "system", "content": prompt}
    order = [prompt.index(real_estate.global_prompt),
             prompt.index("Determine the type of property inquiry."),
             prompt.index("Reply in English (United States)."),
             prompt.index("short spoken sentences"),
             prompt.index("say your reply to the caller first")]
    assert order == sorted(order)
    assert "markdown" in prompt and "one question at a time" in prompt


def test_plan_turn_warns_against_goodbyes_only_where_an_end_or_transfer_comes_next(real_estate):
    closing = "do not say goodbye"
    assert closing in plan_turn(real_estate, state_at("summary_confirmation_node"), "ok").system_prompt
    assert closing not in plan_turn(real_estate, state_at("inquiry_type_node"), "ok").system_prompt


def test_plan_turn_keeps_the_last_twenty_history_messages_then_the_new_utterance(real_estate):
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(30)]
    plan = plan_turn(real_estate, state_at("inquiry_type_node", messages=history), "newest")
    assert len(plan.messages) == 1 + 20 + 1
    assert plan.messages[1] == {"role": "user", "content": "message 10"}
    assert plan.messages[-2] == {"role": "assistant", "content": "message 29"}
    assert plan.messages[-1] == {"role": "user", "content": "newest"}


def test_plan_turn_history_limit_zero_sends_no_history(real_estate):
    history = [{"role": "user", "content": "old"}, {"role": "assistant", "content": "older reply"}]
    plan = plan_turn(real_estate, state_at("inquiry_type_node", messages=history), "now", history_limit=0)
    assert [m["role"] for m in plan.messages] == ["system", "user"]


def test_plan_turn_offers_record_variables_with_json_schema_types_and_enums(loan):
    plan = plan_turn(loan, state_at("collect_node"), "I'm Ana and I work full time")
    record = tool_named(plan, RECORD_VARIABLES_TOOL)["function"]
    properties = record["parameters"]["properties"]
    assert properties["applicant_name"]["type"] == "string"
    assert properties["employment_status"] == {
        "type": "string", "description": "How the applicant earns a living",
        "enum": ["employed", "self_employed", "unemployed"]}
    assert properties["annual_income"]["type"] == "number"
    assert properties["loan_amount"]["type"] == "integer"
    assert properties["wants_human"]["type"] == "boolean"  # global variable (no nodeId)
    assert "call_duration" not in properties  # the platform's own variable, never the LLM's
    assert "required" not in record["parameters"]
    # every edge here is logical: decided locally, so no transition tool
    assert tool_named(plan, TRANSITION_TOOL) is None


def test_plan_turn_fills_placeholders_and_is_then_not_cacheable(loan):
    state = state_at("offer_node", {"applicant_name": "Ana Silva", "loan_amount": 250000})
    plan = plan_turn(loan, state, "sounds good")
    assert "Tell Ana Silva that a loan of 250000 dollars looks possible" in plan.system_prompt
    assert "{{" not in plan.system_prompt
    assert plan.cacheable is False
    assert loan.nodes["offer_node"].cacheable is False
    assert loan.nodes["collect_node"].cacheable is True
    assert plan_turn(loan, state_at("collect_node"), "hi").cacheable is True


def test_explicit_cacheable_flag_overrides_the_placeholder_rule(loan):
    payload = load_fixture("loan_prequalification_logical.json")
    node_data(payload, "collect_node")["cacheable"] = False
    assert Workflow.from_payload(payload).nodes["collect_node"].cacheable is False
    assert plan_turn(Workflow.from_payload(payload), state_at("collect_node"), "hi").cacheable is False


def test_plan_turn_on_an_unknown_node_raises(real_estate):
    with pytest.raises(WorkflowError):
        plan_turn(real_estate, state_at("nope"), "hello")


# --------------------------------------------------------------------------- apply_turn


@pytest.mark.parametrize(
    "edge_id, branch",
    [("edge_2", "buyer_requirements_node"), ("edge_3", "seller_details_node"),
     ("edge_4", "rental_requirements_node"), ("edge_5", "investment_consultation_node")],
)
def test_apply_turn_follows_transition_to_each_inquiry_branch(real_estate, edge_id, branch):
    outcome = apply_turn(real_estate, state_at("inquiry_type_node"), "Sure.", [(TRANSITION_TOOL, {"edge_id": edge_id})])
    assert outcome.next_node == branch
    assert outcome.transitioned_via == edge_id
    assert outcome.action is None and outcome.action_message is None and outcome.destination is None


def test_apply_turn_to_the_transfer_node_returns_transfer_message_and_destination(real_estate):
    outcome = apply_turn(real_estate, state_at("summary_confirmation_node"), "Of course.",
                         [(TRANSITION_TOOL, {"edge_id": "edge_11"})])
    assert outcome.next_node == "transfer_to_agent_node"
    assert outcome.action == "transfer"
    assert outcome.destination == "+1234567890"
    assert outcome.action_message == real_estate.nodes["transfer_to_agent_node"].transfer_message


def test_apply_turn_to_the_end_node_returns_its_end_message(real_estate):
    outcome = apply_turn(real_estate, state_at("summary_confirmation_node"), "Glad I could help.",
                         [(TRANSITION_TOOL, '{"edge_id": "edge_12"}')])
    assert outcome.next_node == "end_call_node"
    assert outcome.action == "end"
    assert outcome.action_message.startswith("Thank you for choosing Premier Properties!")
    assert outcome.destination is None


@pytest.mark.parametrize(
    "tool_calls",
    [
        [],
        [(TRANSITION_TOOL, {"edge_id": "edge_99"})],
        [(TRANSITION_TOOL, {"edge_id": "edge_12"})],  # belongs to another node
        [(TRANSITION_TOOL, {})],
        [(TRANSITION_TOOL, "{not json")],
        [("hang_up", {"edge_id": "edge_2"})],
    ],
    ids=["no-call", "unknown-edge", "other-node-edge", "no-args", "bad-json", "unknown-tool"],
)
def test_apply_turn_stays_put_without_a_valid_transition(real_estate, tool_calls):
    outcome = apply_turn(real_estate, state_at("inquiry_type_node", {"x": 1}), "Could you say more?", tool_calls)
    assert outcome.next_node == "inquiry_type_node"
    assert outcome.transitioned_via is None
    assert outcome.action is None
    assert outcome.variables == {"x": 1}


def test_apply_turn_takes_the_first_valid_transition_call(real_estate):
    calls = [(TRANSITION_TOOL, {"edge_id": "bogus"}), (TRANSITION_TOOL, {"edge_id": "edge_4"}),
             (TRANSITION_TOOL, {"edge_id": "edge_2"})]
    assert apply_turn(real_estate, state_at("inquiry_type_node"), "", calls).next_node == "rental_requirements_node"


def test_apply_turn_does_not_mutate_the_state(loan):
    state = state_at("collect_node", {"applicant_name": "Ana"})
    apply_turn(loan, state, "", [(RECORD_VARIABLES_TOOL, {"employment_status": "unemployed"})])
    assert state.variables == {"applicant_name": "Ana"}
    assert state.current_node == "collect_node"


def test_recorded_variables_are_typed_merged_and_unknown_names_ignored(loan):
    state = state_at("collect_node", {"applicant_name": "Ana"})
    outcome = apply_turn(loan, state, "Thanks!", [(RECORD_VARIABLES_TOOL, {
        "annual_income": "42,500", "employment_status": "Self_Employed", "wants_human": "no",
        "favourite_colour": "blue", "loan_amount": 120000.0})])
    assert outcome.variables == {"applicant_name": "Ana", "annual_income": 42500, "employment_status": "self_employed",
                                 "wants_human": False, "loan_amount": 120000}
    assert isinstance(outcome.variables["loan_amount"], int)
    # income < 50000 → the review edge (to a human advisor) fires
    assert outcome.transitioned_via == "logical:e_review"
    assert outcome.action == "transfer" and outcome.destination == "+14155550123"


def test_values_that_do_not_fit_the_declared_type_are_ignored(loan):
    outcome = apply_turn(loan, state_at("collect_node", {"loan_amount": 1000}), "", [(RECORD_VARIABLES_TOOL, {
        "loan_amount": "3.5", "annual_income": "lots", "employment_status": "astronaut", "wants_human": "maybe"})])
    assert outcome.variables == {"loan_amount": 1000}
    assert outcome.next_node == "collect_node"


@pytest.mark.parametrize(
    "recorded, next_node, via, action",
    [
        ({"employment_status": "unemployed"}, "decline_end", "logical:e_unemployed", "end"),
        ({"annual_income": 65000, "loan_amount": 300000}, "offer_node", "logical:e_qualified", None),
        ({"annual_income": 65000, "loan_amount": 900000}, "advisor_transfer", "logical:e_review", "transfer"),
        ({"annual_income": 65000}, "collect_node", None, None),  # loan amount still unknown: keep collecting
        ({"wants_human": True, "employment_status": "unemployed"}, "advisor_transfer", "logical:e_human", "transfer"),
    ],
)
def test_logical_edges_route_on_extracted_variables(loan, recorded, next_node, via, action):
    outcome = apply_turn(loan, state_at("collect_node"), "Let me check.", [(RECORD_VARIABLES_TOOL, recorded)])
    assert (outcome.next_node, outcome.transitioned_via, outcome.action) == (next_node, via, action)
    if action == "end":
        assert outcome.action_message == loan.nodes["decline_end"].end_message


def test_logical_edge_uses_variables_from_earlier_turns(loan):
    state = state_at("collect_node", {"annual_income": 80000})
    outcome = apply_turn(loan, state, "", [(RECORD_VARIABLES_TOOL, {"loan_amount": "200000"})])
    assert outcome.next_node == "offer_node"


def test_a_true_logical_edge_wins_over_a_transition_call(loan):
    outcome = apply_turn(loan, state_at("offer_node", {"wants_human": True}), "",
                         [(TRANSITION_TOOL, {"edge_id": "e_accept"})])
    # offer_node has no logical edge, so the LLM's choice stands there ...
    assert outcome.next_node == "accepted_end"
    payload = load_fixture("loan_prequalification_logical.json")
    payload["edges"].append({"id": "e_offer_logic", "source": "offer_node", "target": "advisor_transfer",
                             "data": {"type": "logical", "logicalConditions": [
                                 {"variable": "wants_human", "operator": "==", "value": "true"}]}})
    workflow = Workflow.from_payload(payload)
    outcome = apply_turn(workflow, state_at("offer_node", {"wants_human": True}), "",
                         [(TRANSITION_TOOL, {"edge_id": "e_accept"})])
    # ... but a logical edge that holds decides without the LLM
    assert outcome.next_node == "advisor_transfer"
    assert outcome.transitioned_via == "logical:e_offer_logic"


def test_combined_edge_is_offered_to_the_llm_with_its_text(loan):
    plan = plan_turn(loan, state_at("offer_node"), "can I talk to someone")
    transition = tool_named(plan, TRANSITION_TOOL)["function"]
    assert transition["parameters"]["properties"]["edge_id"]["enum"] == ["e_accept", "e_offer_human"]
    assert "wants_human == true or the caller asks to speak to an advisor" in transition["description"]
    outcome = apply_turn(loan, state_at("offer_node"), "", [(TRANSITION_TOOL, {"edge_id": "e_offer_human"})])
    assert outcome.action == "transfer"


def test_landing_on_a_pass_through_node_follows_it():
    payload = {
        "globalPrompt": "Be brief.",
        "nodes": [
            {"id": "s", "type": "startNode", "data": {"label": "Start"}},
            {"id": "hub", "type": "routerNote", "data": {"label": "Hub"}},
            {"id": "a", "type": "conversationNode", "data": {"label": "A", "prompt": "Ask if they are done."}},
            {"id": "b", "type": "conversationNode", "data": {"label": "B", "prompt": "Ask how they heard of us."}},
        ],
        "edges": [
            {"id": "s_hub", "source": "s", "target": "hub", "data": {"type": "none"}},
            {"id": "hub_a", "source": "hub", "target": "a", "data": {"type": "none", "isDefault": True}},
            {"id": "a_hub", "source": "a", "target": "hub", "data": {"type": "ai_based", "aiCondition": "start over"}},
            {"id": "a_b", "source": "a", "target": "b", "data": {"type": "ai_based", "aiCondition": "done"}},
        ],
    }
    workflow = Workflow.from_payload(payload)
    assert workflow.problems() == []
    assert workflow.nodes["hub"].kind == "other"
    assert workflow.entry_node_id() == "a"
    outcome = apply_turn(workflow, state_at("a"), "", [(TRANSITION_TOOL, {"edge_id": "a_hub"})])
    assert outcome.next_node == "a" and outcome.transitioned_via == "a_hub"


# --------------------------------------------------------------------------- logical conditions


def cond(variable, operator, value, combine_with=None) -> LogicalCondition:
    return LogicalCondition(variable=variable, operator=operator, value=value, combine_with=combine_with)


@pytest.mark.parametrize(
    "operator, actual, expected, holds",
    [
        ("==", "Buy", "buy", True), ("==", 5, "5", True), ("==", 5.0, 5, True), ("==", "sell", "buy", False),
        ("==", True, "true", True), ("==", False, True, False),
        ("!=", "buy", "sell", True), ("!=", 3, "3", False),
        (">", 10, 9, True), (">", "10", 9, True), (">", 9, 10, False), (">", "abc", 1, False),
        ("<", 2, "10", True), ("<", 10, 2, False),
        (">=", 50000, 50000, True), (">=", 49999.5, 50000, False),
        ("<=", 500000, "500000", True), ("<=", 500001, 500000, False),
        ("contains", "three bedroom house", "Bedroom", True), ("contains", ["pool", "garden"], "garden", True),
        ("contains", "flat", "house", False),
        ("not_contains", "flat with parking", "pool", True), ("not_contains", ["pool"], "pool", False),
    ],
)
def test_every_operator_compares_with_numeric_coercion(operator, actual, expected, holds):
    assert conditions_hold([cond("v", operator, expected)], {"v": actual}) is holds


@pytest.mark.parametrize("operator", ["==", "!=", ">", "<", ">=", "<=", "contains", "not_contains"])
def test_an_unset_variable_never_satisfies_a_condition(operator):
    assert conditions_hold([cond("missing", operator, "x")], {}) is False


@pytest.mark.parametrize(
    "values, holds",
    [((True, True), True), ((True, False), False), ((False, True), False)],
)
def test_and_needs_both_conditions(values, holds):
    conditions = [cond("a", "==", True), cond("b", "==", True, "and")]
    assert conditions_hold(conditions, {"a": values[0], "b": values[1]}) is holds


@pytest.mark.parametrize(
    "values, holds",
    [((True, False), True), ((False, True), True), ((False, False), False)],
)
def test_or_needs_either_condition(values, holds):
    conditions = [cond("a", "==", True), cond("b", "==", True, "or")]
    assert conditions_hold(conditions, {"a": values[0], "b": values[1]}) is holds


def test_conditions_combine_left_to_right_as_the_editor_previews_them():
    # (a or b) and c — not a or (b and c)
    conditions = [cond("a", "==", True), cond("b", "==", True, "or"), cond("c", "==", True, "and")]
    assert conditions_hold(conditions, {"a": True, "b": False, "c": False}) is False
    assert conditions_hold(conditions, {"a": True, "b": False, "c": True}) is True


def test_second_condition_without_combine_with_means_and():
    conditions = [cond("a", "==", 1), cond("b", "==", 1)]
    assert conditions_hold(conditions, {"a": 1, "b": 0}) is False
    assert conditions_hold(conditions, {"a": 1, "b": 1}) is True


def test_no_conditions_never_hold():
    assert conditions_hold([], {"a": 1}) is False


@pytest.mark.parametrize(
    "var_type, enum_values, value, expected",
    [
        ("integer", None, "7", (True, 7)), ("integer", None, 7.0, (True, 7)), ("integer", None, "7.5", (False, None)),
        ("integer", None, True, (False, None)), ("number", None, "$1,250.50", (True, 1250.5)),
        ("number", None, "nan", (False, None)), ("boolean", None, "Yes", (True, True)),
        ("boolean", None, 0, (True, False)), ("string", None, "  Ana  ", (True, "Ana")),
        ("string", ("Dr Chan", "Dr Wong"), "dr wong", (True, "Dr Wong")),
        ("string", ("Dr Chan", "Dr Wong"), "Dr Lee", (False, None)), ("string", None, "", (False, None)),
    ],
)
def test_coerce_variable_types_values_or_rejects_them(var_type, enum_values, value, expected):
    spec = VariableSpec(name="v", type=var_type, description=None, enum_values=enum_values, node_id=None)
    assert coerce_variable(spec, value) == expected


# --------------------------------------------------------------------------- termination


@pytest.mark.parametrize(
    "utterance",
    ["bye", "Bye!", "ok bye!", "that's all, thanks bye", "That’s all.", "thats all", "Goodbye.",
     "唔該，拜拜", "拜拜。", "好，再見！", "好，bye", "ＢＹＥ"],
)
def test_goodbye_phrases_at_the_end_terminate(utterance):
    assert detect_termination(utterance, GOODBYE_PHRASES) is True


@pytest.mark.parametrize(
    "utterance",
    ["I'll call back about the bye-law tomorrow", "are you all set to show me the house",
     "bye the way, I want to sell", "that's all I know about the garden, what else do you need to know",
     "goodbyes are hard", "拜拜之前想問多一樣嘢", "", "   ", "I want to buy"],
)
def test_goodbye_words_elsewhere_do_not_terminate(utterance):
    assert detect_termination(utterance, GOODBYE_PHRASES) is False


def test_phrase_must_match_whole_words():
    assert detect_termination("goodbye", ["bye"]) is False
    assert detect_termination("ok, good bye", ["bye"]) is True
    assert detect_termination("bye", []) is False


def test_termination_outcome_ends_at_the_end_node_with_its_message(real_estate):
    outcome = termination_outcome(real_estate, state_at("inquiry_type_node", {"k": "v"}))
    assert outcome.next_node == "end_call_node"
    assert outcome.action == "end"
    assert outcome.action_message == real_estate.nodes["end_call_node"].end_message
    assert outcome.transitioned_via == "termination_phrase"
    assert outcome.variables == {"k": "v"}


def test_termination_outcome_prefers_an_end_node_reachable_from_here(clinic):
    assert clinic.first_end_node().id == "goodbye_end"
    assert termination_outcome(clinic, state_at("booking_node")).next_node == "confirm_end"
    assert termination_outcome(clinic, state_at("triage_node")).next_node == "goodbye_end"


def test_termination_outcome_without_end_node_leaves_the_goodbye_to_the_caller(minimal):
    assert minimal.first_end_node() is None
    outcome = termination_outcome(minimal, state_at("faq_node"))
    assert outcome.action == "end"
    assert outcome.action_message is None
    assert outcome.next_node == "faq_node"


# --------------------------------------------------------------------------- a scripted walk


def run_turn(workflow: Workflow, state: ConversationState, caller: str, reply: str, tool_calls):
    """One caller turn as the orchestrator would run it: plan, 'stream' a scripted reply, apply, record history."""
    plan = plan_turn(workflow, state, caller)
    offered = tool_named(plan, TRANSITION_TOOL)
    for name, args in tool_calls:
        if name == TRANSITION_TOOL:
            assert offered is not None
            assert args["edge_id"] in offered["function"]["parameters"]["properties"]["edge_id"]["enum"]
    outcome = apply_turn(workflow, state, reply, tool_calls)
    messages = state.messages + [{"role": "user", "content": caller}, {"role": "assistant", "content": reply}]
    return ConversationState(current_node=outcome.next_node, variables=outcome.variables, messages=messages), outcome


@pytest.mark.parametrize(
    "branch_edge, branch_node, branch_exit",
    [("edge_2", "buyer_requirements_node", "edge_6"), ("edge_3", "seller_details_node", "edge_7"),
     ("edge_4", "rental_requirements_node", "edge_8"), ("edge_5", "investment_consultation_node", "edge_9")],
)
@pytest.mark.parametrize("closing_edge, action", [("edge_11", "transfer"), ("edge_12", "end")])
def test_scripted_walk_of_the_real_estate_flow_reaches_every_branch_and_ending(
        real_estate, branch_edge, branch_node, branch_exit, closing_edge, action):
    script = [
        ("Hi, I have a property question.", "Happy to help. Buy, sell, rent or invest?", None, "inquiry_type_node"),
        ("That one, please.", "Great, let's go through it.", branch_edge, branch_node),
        ("Here are all my details.", "Thanks, that's everything I need.", branch_exit, "contact_details_node"),
        ("I'm Sam, 555 0100.", "Got it, thank you.", "edge_10", "summary_confirmation_node"),
        ("Sounds good.", "Wonderful.", closing_edge,
         "transfer_to_agent_node" if action == "transfer" else "end_call_node"),
    ]
    state = state_at(real_estate.entry_node_id(), messages=[{"role": "assistant", "content": real_estate.greeting}])
    outcomes = []
    for caller, reply, edge_id, expected_node in script:
        calls = [(TRANSITION_TOOL, {"edge_id": edge_id})] if edge_id else []
        state, outcome = run_turn(real_estate, state, caller, reply, calls)
        outcomes.append(outcome)
        assert state.current_node == expected_node
    assert [o.transitioned_via for o in outcomes] == [None, branch_edge, branch_exit, "edge_10", closing_edge]
    assert [o.action for o in outcomes] == [None, None, None, None, action]
    assert len(state.messages) == 1 + 2 * len(script)


def test_scripted_walk_of_the_cantonese_clinic_books_then_says_goodbye(clinic):
    state = state_at(clinic.entry_node_id())
    plan = plan_turn(clinic, state, "我想約醫生", language_instruction="請用廣東話回答。")
    assert "請用廣東話回答。" in plan.system_prompt
    outcome = apply_turn(clinic, state, "好呀，幫你約。", [(TRANSITION_TOOL, {"edge_id": "e_book"})])
    state = state_at(outcome.next_node, outcome.variables)
    assert state.current_node == "booking_node"
    plan = plan_turn(clinic, state, "星期五，王醫生")
    assert tool_named(plan, RECORD_VARIABLES_TOOL)["function"]["parameters"]["properties"]["doctor"]["enum"] == [
        "Dr Chan", "Dr Wong"]
    outcome = apply_turn(clinic, state, "好，星期五見王醫生。", [
        (RECORD_VARIABLES_TOOL, {"preferred_date": "Friday", "doctor": "dr wong"}),
        (TRANSITION_TOOL, {"edge_id": "e_booked"})])
    assert outcome.variables == {"preferred_date": "Friday", "doctor": "Dr Wong"}
    assert outcome.action == "end"
    assert outcome.action_message == "預約已經記低咗，我哋會短訊確認。拜拜！"


def test_scripted_emergency_in_the_clinic_transfers_to_the_nurse(clinic):
    outcome = apply_turn(clinic, state_at("triage_node"), "我即刻幫你轉駁。",
                         [(TRANSITION_TOOL, {"edge_id": "e_urgent"})])
    assert (outcome.action, outcome.destination) == ("transfer", "+85223456789")
    assert outcome.action_message == "我而家幫你轉駁去當值護士，請唔好收線。"


# --------------------------------------------------------------------------- module rules


def test_workflow_module_imports_nothing_from_flask():
    imported = set()
    for source in Path(workflow_module.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert "flask" not in imported
    assert imported <= {"__future__", "copy", "functools", "hashlib", "json", "marshal", "math", "re", "unicodedata", "collections",
                        "dataclasses", "typing"}


# ---- validated workflows shared by the calls of one flow (issue 12i) -----------------------------------------

def test_payload_fields_are_every_field_the_parser_reads(real_estate_payload):
    from callweaver.engine.workflow.parse import PAYLOAD_FIELDS, workflow_from_payload

    class Recording(dict):
        read: set = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    body = Recording({**real_estate_payload, "language": "en-US", "name": "Flow", "to": "+15551234567"})
    workflow_from_payload(body)
    assert {"nodes", "edges", "config"} <= Recording.read <= set(PAYLOAD_FIELDS)  # a field read but not in the key would share a stale flow


def test_calls_of_one_flow_share_one_validated_workflow(real_estate_payload):
    from callweaver.engine.workflow.parse import ValidatedWorkflows

    flows = ValidatedWorkflows(limit=2)
    first = flows.get({**real_estate_payload, "to": "+15551234567", "timeout": 30})
    again = flows.get({**copy.deepcopy(real_estate_payload), "to": "+15557654321"})
    assert again is first  # only the flow's own fields make the key
    assert first.version_hash == Workflow.from_payload(real_estate_payload).version_hash
    changed = copy.deepcopy(real_estate_payload)
    changed["globalPrompt"] = (changed.get("globalPrompt") or "") + " Be brief."
    other = flows.get(changed)
    assert other is not first and other.global_prompt.endswith("Be brief.")
    flows.get({"globalPrompt": "A third flow"})
    assert flows.get(real_estate_payload) is not first  # bounded: the least recently used flow was dropped


def test_a_workflow_with_problems_is_refused_every_time_and_never_kept():
    from callweaver.engine.workflow.parse import ValidatedWorkflows

    flows = ValidatedWorkflows()
    broken = {"nodes": [{"id": "a", "type": "conversationNode", "data": {}}], "edges": []}
    for _ in range(2):
        with pytest.raises(WorkflowError):
            flows.get(broken)
    assert len(flows) == 0


def test_flows_whose_json_differs_never_share_a_validated_workflow(real_estate_payload):
    """The cache key tells apart every value JSON tells apart (null, false, 0, 0.0, -0.0, NaN, strings), nested too,
    and equal values from separately parsed bodies (other objects, so no identity) share one flow."""
    import json as json_module

    from callweaver.engine.workflow.parse import ValidatedWorkflows

    flows = ValidatedWorkflows(limit=64)
    text = json_module.dumps(real_estate_payload)
    first = flows.get(json_module.loads(text))
    assert flows.get(json_module.loads(text)) is first
    seen = {}
    for value in (None, False, True, 0, 1, 0.0, -0.0, 1.0, float("nan"), float("inf"), "", "0", "null", [], {}, [None]):
        for field in ("config", "globalPrompt", "name"):
            payload = json_module.loads(text)
            if field == "config":
                payload["config"] = {**(payload.get("config") or {}), "temperatureNote": value}
            else:
                payload[field] = value if isinstance(value, str) else json_module.dumps(value)
            try:
                workflow = flows.get(payload)
            except WorkflowError:
                continue
            encoded = json_module.dumps(payload, sort_keys=False)
            assert seen.setdefault(id(workflow), encoded) == encoded, (field, value)
            assert flows.get(json_module.loads(encoded)) is workflow  # the same JSON text: the same flow


def test_an_integer_beyond_any_float_is_not_a_number_to_compare_or_record():
    """A model's record_variables (or a flow's condition value) with hundreds of digits: math.isfinite raised."""
    from callweaver.engine.workflow.conditions import as_number

    assert as_number(10 ** 400) is None and as_number(-(10 ** 400)) is None
    assert as_number(10 ** 15) == 10 ** 15
