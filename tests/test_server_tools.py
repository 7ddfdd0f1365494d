"""Tool calls through the openai client, on a tiny model whose template renders tools."""

from __future__ import annotations

import json
import shutil

import pytest

from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig
from offload_engine.server.tools import parse_tool_calls
from tests.test_server import TIMEOUT, LiveServer, httpx  # also skips without the extra

pytest.importorskip("xgrammar")  # forced calls (tool_choice) are constrained decoding

# A Hermes-style template, as Qwen2.5's: tools in the system turn, calls in <tool_call> tags,
# tool results back as <tool_response> in a user turn
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% for tool in tools %}{{ tool.function | tojson }}{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                   "required": ["city"]}}}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def tool_model(qwen2_q, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tools") / "tiny-tools"
    shutil.copytree(qwen2_q, directory)
    (directory / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return directory


@pytest.fixture(scope="module")
def live(tool_model):
    with load(tool_model, device="cpu", progress=False) as engine, \
            LiveServer(engine, ServerConfig(max_batch=2)) as server:
        yield server


def test_two_step_tool_conversation_with_the_openai_client(live):
    client, model = live.client(), live.service.model_id
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                           tool_choice=FORCE_WEATHER, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")

    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER],
                                           max_tokens=8, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    rendered = [dict(m, content=m.get("content") or "") for m in history]
    rendered[1]["tool_calls"] = [{"id": call.id, "type": "function", "function": {
        "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]
    prompt = live.service.encode_with_tools(rendered, [WEATHER])
    assert final.usage.prompt_tokens == len(prompt)  # the call and its result were rendered
    assert "sunny, 21 C" in live.service.engine.tokenizer.decode(prompt)


def test_streamed_tool_call_arrives_as_delta_tool_calls(live):
    chunks = list(live.client().chat.completions.create(
        model=live.service.model_id, messages=ASK, tools=[WEATHER], tool_choice="required",
        max_tokens=100, stream=True))
    calls = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Oslo")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks).strip()


def test_tool_choice_needs_tools_and_a_known_name(live):
    url, model = f"{live.url}/v1/chat/completions", live.service.model_id
    for body, param in (({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [WEATHER], "tool_choice": {
                            "type": "function", "function": {"name": "nope"}}}, "tool_choice")):
        response = httpx.post(url, timeout=TIMEOUT, json={"model": model, "messages": ASK,
                                                          "max_tokens": 4, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_template_without_tools_gets_400(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine, \
            LiveServer(engine, ServerConfig(max_batch=1)) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT, json={
            "model": server.service.model_id, "messages": ASK, "tools": [WEATHER]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "tools_unsupported"


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me check.<tool_call>{"name": "f", "arguments": {}}</tool_call>'
     '<tool_call>{"name": "g", "arguments": {"b": "x"}}</tool_call>', "Let me check.",
     [("f", {}), ("g", {"b": "x"})]),
    ('{"name": "f", "parameters": {"a": 2}}', None, [("f", {"a": 2})]),  # Llama 3.x
    ('<tool_call>{"name": "f", "arguments": </tool_call>', None, []),  # broken: kept as text
    ('{"a": 1}', None, []),
    ("plain words", None, []),
])
def test_parse_tool_calls(text, content, calls):
    left, parsed = parse_tool_calls(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] \
        == calls
    assert left == (content if calls else text)
