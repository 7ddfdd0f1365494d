"""Request parameters: refused when unsupported, honoured when supported (penalties, logprobs)."""

from __future__ import annotations

import math

import pytest
import torch

from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig
from tests.test_server import TIMEOUT, LiveServer, httpx  # also skips without the extra

MESSAGES = [{"role": "user", "content": "Tell me about lists."}]


@pytest.fixture(scope="module")
def engine(qwen2_q):
    # float32: the written-out reference below re-runs the whole prompt every step (SDPA
    # over many queries) where the server decodes a token at a time (the C++ decode
    # attention, kernels/cpu_decode.py); in bfloat16 the two round differently
    with load(qwen2_q, device="cpu", progress=False, dtype="float32") as engine:
        yield engine


@pytest.fixture(scope="module")
def live(engine):
    with LiveServer(engine, ServerConfig(max_batch=4)) as server:
        yield server


def _post(live, path: str, **body) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/{path}", timeout=TIMEOUT,
                      json={"model": live.service.model_id, **body})


@pytest.mark.parametrize("path, extra, named", [
    ("chat/completions", {"logit_bias": {"1": 5}, "echo": True}, ["logit_bias", "echo"]),
    ("completions", {"tools": []}, ["tools"]),
    ("chat/completions", {"logit_bias": {"1": 5}}, ["logit_bias"]),
    ("completions", {"best_of": 2}, ["best_of"]),
    ("completions", {"suffix": "x"}, ["suffix"]),
])
def test_unsupported_parameters_get_400_naming_them(live, path, extra, named):
    body = {"messages": MESSAGES} if path.startswith("chat") else {"prompt": "A list"}
    response = _post(live, path, max_tokens=2, **body, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == named[0]
    for name in named:
        assert name in error["message"]


def test_unsupported_message_field_is_named(live):
    messages = [{"role": "assistant", "content": "x", "refusal": "no"}]
    response = _post(live, "chat/completions", messages=MESSAGES + messages, max_tokens=2)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages.1.refusal"


def test_user_field_is_accepted(live):
    response = _post(live, "chat/completions", messages=MESSAGES, max_tokens=2, user="u-1")
    assert response.status_code == 200, response.text


def _reference_greedy(engine, prompt_ids, steps, presence=0.0, frequency=0.0):
    """Greedy decoding with OpenAI's penalties, written out: full forward every step."""
    ids, generated = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(steps):
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for token in set(generated):
                logits[token] -= presence + frequency * generated.count(token)
            generated.append(int(torch.argmax(logits)))
            ids.append(generated[-1])
    return generated


@pytest.mark.parametrize("presence, frequency", [(0.0, 2.0), (2.0, 0.0), (1.0, 1.0)])
def test_penalties_match_a_written_out_reference(live, engine, presence, frequency):
    prompt = "The sort method"
    prompt_ids = engine.tokenizer(prompt)["input_ids"]
    expected = _reference_greedy(engine, prompt_ids, 12, presence, frequency)
    assert expected != _reference_greedy(engine, prompt_ids, 12)  # the penalty matters here
    response = _post(live, "completions", prompt=prompt, max_tokens=12, temperature=0,
                     presence_penalty=presence, frequency_penalty=frequency, logprobs=0)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == engine.tokenizer.decode(
        expected, skip_special_tokens=True)


def test_penalty_out_of_range_is_refused(live):
    response = _post(live, "completions", prompt="x", max_tokens=2, presence_penalty=3)
    assert response.status_code == 400 and response.json()["error"]["param"] == \
        "presence_penalty"


def test_chat_logprobs_are_the_models_and_stream_the_same(live, engine):
    body = dict(messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    whole = _post(live, "chat/completions", **body).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] == 6
    for item in content:  # greedy: the chosen token is the likeliest
        assert len(item["top_logprobs"]) == 3
        assert item["top_logprobs"][0]["logprob"] == pytest.approx(item["logprob"])
        assert item["logprob"] <= 0 and item["bytes"] == list(item["token"].encode())
        assert sum(math.exp(t["logprob"]) for t in item["top_logprobs"]) <= 1 + 1e-6
    prompt_ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
    assert content[0]["logprob"] == pytest.approx(
        float(torch.log_softmax(logits.float(), -1).max()), abs=1e-4)

    with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=TIMEOUT,
                      json={"model": live.service.model_id, "stream": True, **body}) as reply:
        import json

        chunks = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: {")]
    streamed = [item for chunk in chunks for choice in chunk["choices"]
                if choice["logprobs"] for item in choice["logprobs"]["content"]]
    assert streamed == content


def test_completion_logprobs_use_the_legacy_lists(live):
    reply = _post(live, "completions", prompt="A list", max_tokens=5, temperature=0,
                  logprobs=2).json()
    logprobs = reply["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    without = _post(live, "completions", prompt="A list", max_tokens=5, temperature=0).json()
    assert without["choices"][0]["logprobs"] is None


def test_top_logprobs_needs_logprobs(live):
    response = _post(live, "chat/completions", messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


YES_NO = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"]}}}


def test_json_schema_is_enforced_while_decoding(live):
    pytest.importorskip("xgrammar")
    import json

    for seed in range(3):
        body = dict(messages=MESSAGES, max_tokens=60, seed=seed, temperature=1.0)
        free = _post(live, "chat/completions", **body).json()["choices"][0]["message"]
        with pytest.raises(ValueError):  # a random model does not write JSON by itself
            json.loads(free["content"])
        reply = _post(live, "chat/completions", response_format=YES_NO, **body).json()
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")


def test_json_object_replies_parse(live):
    pytest.importorskip("xgrammar")
    import json

    finished = 0
    for seed in range(6):
        reply = _post(live, "completions", prompt="A list", max_tokens=120, seed=seed,
                      temperature=1.0, response_format={"type": "json_object"}).json()
        choice = reply["choices"][0]
        assert choice["text"].startswith("{")
        if choice["finish_reason"] == "stop":  # else max_tokens ended a long string value
            assert isinstance(json.loads(choice["text"]), dict)
            finished += 1
    assert finished


def test_bad_response_formats_get_400(live):
    for response_format, param in (
            ({"type": "json_schema"}, "response_format.json_schema"),
            ({"type": "yaml"}, "response_format.type"),
            ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
             "response_format.json_schema.schema")):
        if param.endswith("schema") and "json_schema" in response_format:
            pytest.importorskip("xgrammar")
        response = _post(live, "chat/completions", messages=MESSAGES, max_tokens=2,
                         response_format=response_format)
        assert response.status_code == 400, (response_format, response.text)
        assert response.json()["error"]["param"] == param


def test_top_k_min_p_repetition_penalty_are_applied_and_equal_the_cli(live, engine, capsys):
    """Through the openai client's extra_body; top_k 1 (or min_p 1) leaves one token, so
    the reply at temperature 2 is greedy decoding with the penalty: a written-out
    reference, and what `run` prints with the same flags."""
    from offload_engine.cli import main
    from tests.test_sampling import reference_tokens

    client = live.client()
    messages = [{"role": "user", "content": "Sort a list of lists, and sort it again"}]
    prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      return_dict=True)["input_ids"]
    expected = engine.tokenizer.decode(reference_tokens(engine, prompt_ids, 12, 1.5),
                                       skip_special_tokens=True)
    plain = engine.tokenizer.decode(reference_tokens(engine, prompt_ids, 12),
                                    skip_special_tokens=True)
    assert expected != plain
    for extra in ({"top_k": 1, "repetition_penalty": 1.5},
                  {"min_p": 1.0, "repetition_penalty": 1.5, "top_k": -1}):
        replies = {client.chat.completions.create(
            model=live.service.model_id, messages=messages, max_tokens=12, temperature=2.0,
            seed=seed, extra_body=extra).choices[0].message.content for seed in (1, 2)}
        assert replies == {expected}, extra
    unpenalized = client.chat.completions.create(
        model=live.service.model_id, messages=messages, max_tokens=12,
        extra_body={"top_k": 1}).choices[0].message.content
    assert unpenalized == plain
    # no sampling field: the model's generation_config.json, which asks for no sampling
    defaults = {client.chat.completions.create(
        model=live.service.model_id, messages=messages, max_tokens=12).choices[0].message.content
        for _ in range(2)}
    assert defaults == {plain}
    assert main(["run", str(engine.directory), messages[0]["content"], "--chat", "-n", "12",
                 "--temp", "2", "--top-k", "1", "--repeat-penalty", "1.5", "--seed", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("field, value", [("top_k", -2), ("min_p", 1.5),
                                          ("repetition_penalty", 0), ("top_k", 1.5)])
def test_sampling_fields_out_of_range_are_refused(live, field, value):
    response = _post(live, "completions", prompt="A list", max_tokens=2, **{field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field
