"""The C++ decode steps (kernels/cpu_decode.py) against their pure-torch references, and the
model forwards built on them (runtime/cpu_decode.py) against transformers' own code."""

import pytest
import torch

from offload_engine import load
from offload_engine.kernels import cpu_decode
from offload_engine.runtime.cpu_decode import ResidentLayer

pytestmark = pytest.mark.skipif(not cpu_decode.ready(),
                                reason="the C++ CPU kernels do not build here")

BF16_ULP = 2.0 ** -7  # relative spacing of bfloat16 values


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, in units of bfloat16's relative spacing at the value."""
    scale = expected.float().abs().clamp_min(1e-3)
    return ((actual.float() - expected.float()).abs() / scale).max().item() / BF16_ULP


def test_rope_and_silu_gate_equal_the_stock_math_bit_for_bit_in_bfloat16():
    torch.manual_seed(0)
    # a transposed view, as attention hands it over; head dim 24 (the tiny Llama's)
    x = torch.randn(2, 3, 5, 24, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = torch.randn(2, 2, 3, 24, dtype=torch.bfloat16).unbind(0)
    assert torch.equal(cpu_decode.rope(x, cos, sin), cpu_decode.rope_reference(x, cos, sin))
    gate, up = torch.randn(2, 3, 160, dtype=torch.bfloat16).unbind(0)
    assert torch.equal(cpu_decode.silu_mul(gate, up), cpu_decode.silu_mul_reference(gate, up))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_the_stock_math(dtype):
    torch.manual_seed(1)
    x = torch.randn(4, 7, 96, dtype=dtype) * 30  # hidden states are large in real models
    weight = torch.randn(96, dtype=dtype)
    ours = cpu_decode.rms_norm(x, weight, 1e-5)
    expected = cpu_decode.rms_norm_reference(x, weight, 1e-5)
    assert ours.shape == x.shape and ours.dtype == dtype
    if dtype == torch.bfloat16:  # only the order of the float32 sum differs: one step at most
        assert ulps(ours, expected) <= 2.0
    else:
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,tokens", [(9, 3, 1), (4, 2, 37), (4, 4, 3000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_matches_the_reference(heads, kv_heads, tokens, dtype):
    torch.manual_seed(tokens)
    q = torch.randn(1, heads, 1, 64, dtype=dtype)
    # views into a larger cache (stride over the token axis), as a quantized KV cache gives
    keys = torch.randn(1, kv_heads, tokens + 5, 64, dtype=dtype)[:, :, :tokens]
    values = torch.randn(1, kv_heads, tokens + 5, 64, dtype=dtype)[:, :, :tokens]
    ours = cpu_decode.decode_attention(q, keys, values, 0.125)
    expected = cpu_decode.decode_attention_reference(q, keys, values, 0.125)
    assert ours.shape == (1, 1, heads * 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float(), keys.float(), values.float(), scale=0.125, enable_gqa=True)
    torch.testing.assert_close(ours.float(), sdpa.transpose(1, 2).reshape(1, 1, -1),
                               rtol=1e-2, atol=1e-2)


def test_a_padded_batch_row_attends_exactly_as_it_does_alone():
    """The server's batched decode hands SDPA's boolean mask (B, 1, 1, T); masked keys are
    skipped, so each row gets the bits it gets alone over its own keys."""
    torch.manual_seed(2)
    q = torch.randn(3, 4, 1, 16, dtype=torch.bfloat16)
    keys, values = torch.randn(2, 3, 2, 10, 16, dtype=torch.bfloat16).unbind(0)
    mask = torch.rand(3, 1, 1, 10) > 0.4
    mask[..., 0] = True
    batched = cpu_decode.decode_attention(q, keys, values, 0.25, mask)
    assert torch.equal(batched, cpu_decode.decode_attention_reference(q, keys, values, 0.25,
                                                                      mask))
    for row in range(3):
        kept = mask[row, 0, 0].nonzero().flatten()
        alone = cpu_decode.decode_attention(q[row:row + 1], keys[row:row + 1, :, kept],
                                            values[row:row + 1, :, kept], 0.25)
        assert torch.equal(alone[0], batched[row])


def test_bad_inputs_are_refused_with_the_step_named():
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="decode_attention"):
        cpu_decode.decode_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), 1.0)
    with pytest.raises(RuntimeError, match="rms_norm"):
        cpu_decode.rms_norm(torch.randn(2, 8, dtype=torch.float16), torch.randn(8).half(), 1e-5)


def _minimum_budget(directory) -> int:
    with load(directory, progress=False, device="cpu", dtype="bfloat16") as engine:
        return engine.plan.minimum_budget


def _logits_and_tokens(directory, budget, dtype="bfloat16", steps=10):
    with load(directory, progress=False, device="cpu", dtype=dtype, gpu_budget=budget) as engine, \
            torch.no_grad():
        ids = engine.tokenizer("The class statement defines", return_tensors="pt")["input_ids"]
        resident = [isinstance(getattr(layer, "resident_step", None), ResidentLayer)
                    for layer in engine.model.model.layers]
        logits = engine.model(ids).logits
        out = engine.generate("The class statement defines", greedy=True, max_new_tokens=steps)
        return logits, out.token_ids, resident, engine.cache.stats.hits


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_resident_layers_run_in_two_calls_and_equal_the_per_module_path(request, arch):
    """Unbounded, every layer's weights stay: its decode step is the two C++ calls. At the
    minimum budget they stream and each module runs its own step. Same ops in the same
    order: the same bits, so the budget never changes a token (DESIGN.md's invariant)."""
    directory = request.getfixturevalue(f"{arch}_q")
    logits, tokens, resident, hits = _logits_and_tokens(directory, None)
    assert all(resident)
    small_logits, small_tokens, small_resident, _ = _logits_and_tokens(
        directory, _minimum_budget(directory))
    assert not any(small_resident)
    assert torch.equal(logits, small_logits)
    assert tokens == small_tokens
    cpu_decode.set_enabled(False)
    try:
        stock_logits, stock_tokens, _, stock_hits = _logits_and_tokens(directory, None)
    finally:
        cpu_decode.set_enabled(True)
    # transformers' own code rounds the same steps in another order: close, not equal
    torch.testing.assert_close(logits, stock_logits, rtol=0, atol=0.1)
    assert hits == stock_hits  # every weight use is counted as before


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_float32_keeps_the_stock_code(request, arch):
    """float32 is held to transformers' logits within 1e-5 (tests/tiny.py), tighter than the
    order of a float32 sum: the steps stay out of it."""
    directory = request.getfixturevalue(f"{arch}_q")
    logits, tokens, resident, _ = _logits_and_tokens(directory, None, dtype="float32")
    assert not any(resident)
    cpu_decode.set_enabled(False)
    try:
        stock_logits, stock_tokens, _, _ = _logits_and_tokens(directory, None, dtype="float32")
    finally:
        cpu_decode.set_enabled(True)
    assert torch.equal(logits, stock_logits) and tokens == stock_tokens


def test_a_running_profiler_sees_every_linear(llama_q):
    from torch.profiler import ProfilerActivity, profile

    with load(llama_q, progress=False, device="cpu", dtype="bfloat16") as engine:
        engine.generate("The class statement defines", greedy=True, max_new_tokens=2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate("The class statement defines", greedy=True, max_new_tokens=3)
        linears = len(engine.model.model.layers) * 7
    ranges = sum(1 for event in prof.events() if event.name == "offload.linear")
    assert ranges >= 3 * linears  # prefill and two decode steps, each linear its own range


def test_the_two_call_layer_steps_aside_where_the_linears_would_take_another_path(llama_q):
    from offload_engine.kernels import gateway

    with load(llama_q, progress=False, device="cpu", dtype="bfloat16") as engine:
        step = engine.model.model.layers[0].resident_step
        hidden = torch.randn(1, 1, engine.model.config.hidden_size, dtype=torch.bfloat16)
        assert step.takes(hidden)
        gateway.force_reference(True)
        try:
            assert not step.takes(hidden)  # the linears run the reference: so does the layer
        finally:
            gateway.force_reference(False)
        gateway._cpu_gemv_enabled = True  # OFFLOAD_CPU_GEMV=1: our int4 kernel, not torch's
        try:
            assert not step.takes(hidden)
        finally:
            gateway._cpu_gemv_enabled = False
