"""--compile: the decode step through torch.compile gives eager's greedy tokens, compiles
once per cache bucket, and is chosen with CUDA graphs only on CUDA with nothing streamed.

Compiling takes tens of seconds on a shared 2-core CPU, so the cases are few and each
covers one architecture with one KV cache mode and one budget. They compute in float32:
on tiny random models a bfloat16 rounding difference (attention over the static bucket
sums in another order) flips a near-tie argmax, which says nothing about the step.
"""

import gc
import weakref

import pytest
import torch

from tests import tiny

STREAMING = "256KiB"  # below the tiny models' ~0.5 MB of float weights: some stream
PROMPT = "The class statement defines"


@pytest.fixture(scope="module")
def qwen3_q(tmp_path_factory, tokenizer_dir):
    from offload_engine.checkpoint.convert import convert
    from offload_engine.quant.layout import QuantSpec

    src = tiny.make_checkpoint(tmp_path_factory.mktemp("qwen3") / "src", "qwen3",
                               tokenizer_dir=tokenizer_dir)
    dst = tmp_path_factory.mktemp("qwen3q") / "q"
    convert(src, dst, QuantSpec("int4", 64), progress=False)
    return dst


def _tokens(directory, compile_: bool, tokens: int, device="cpu", **config):
    from offload_engine import load

    with load(directory, progress=False, device=device, compile=compile_, dtype="float32",
              **config) as engine:
        result = engine.generate(PROMPT, greedy=True, max_new_tokens=tokens)
        streamed = engine.stats["streamed_bytes"]
    assert result.stats.compiled == compile_
    return result, streamed


@pytest.mark.parametrize("arch,kv_cache,budget", [  # qwen2 bf16 unbounded: the test below
    ("llama", "int8", STREAMING),
    ("qwen3", "bf16", STREAMING),
    ("qwen3", "int8", "unbounded"),
])
def test_compiled_greedy_tokens_equal_eager(request, arch, kv_cache, budget):
    directory = request.getfixturevalue(f"{arch}_q")
    config = dict(kv_cache=kv_cache, gpu_budget=budget)
    eager, streamed = _tokens(directory, False, 12, **config)
    compiled, _ = _tokens(directory, True, 12, **config)
    assert (streamed > 0) == (budget == STREAMING)
    assert len(set(eager.token_ids)) > 3  # varied tokens: the comparison means something
    assert compiled.token_ids == eager.token_ids
    assert compiled.stats.forward_passes == eager.stats.forward_passes == 12
    assert compiled.stats.compile_seconds > 0  # the first call compiled, and said so
    assert "compiled (warm-up" in compiled.stats.line()


def test_one_compilation_per_cache_bucket_over_64_tokens(qwen2_q):
    from offload_engine import load
    from offload_engine.runtime.compile_step import compilations

    eager, _ = _tokens(qwen2_q, False, 64)
    with load(qwen2_q, progress=False, device="cpu", compile=True, dtype="float32") as e:
        before = compilations()
        first = e.generate(PROMPT, greedy=True, max_new_tokens=64)
        after_first = compilations()
        # another prompt length in the same 256-token bucket: no new graph
        second = e.generate(PROMPT + " a longer prompt", greedy=True, max_new_tokens=64)
        after_second = compilations()
    model = weakref.ref(e.model)
    del e
    gc.collect()
    assert model() is None  # closed, the compiled model is freed (and dynamo's entries with it)
    assert first.token_ids == eager.token_ids and len(set(eager.token_ids)) > 3
    assert first.stats.new_tokens == 64 and second.stats.new_tokens == 64
    assert after_first - before == 1, "the decode step compiled more than once"
    assert after_second == after_first
    assert second.stats.compile_seconds == 0.0


def test_resident_weights_enter_the_graph_as_constants(qwen3_q):
    """Unbounded: every linear's weight is traced as a constant (the CPU int4 op in the
    graph, no custom op per linear), and the cache still counts its uses."""
    from torch.profiler import profile

    from offload_engine import load

    with load(qwen3_q, progress=False, device="cpu", compile=True) as engine:
        assert engine.stats["cache_format"] == "prepacked"  # auto on CPU: bfloat16, int4 op
        assert engine.cache.inlined == frozenset(engine.cache.order)
        engine.generate(PROMPT, greedy=True, max_new_tokens=4)  # compiles
        with profile() as prof:
            result = engine.generate(PROMPT, greedy=True, max_new_tokens=6)
    names = [event.name for event in prof.events()]
    assert "offload_engine::cached_linear" not in names
    assert names.count("aten::_weight_int4pack_mm_for_cpu") >= 5 * len(engine.cache.order)
    assert result.stats.hit_rate == 1.0 and result.stats.forward_passes == 6
    stats = engine.cache.stats  # prefill (eager) + decode steps (compiled) of both calls
    assert stats.passes == 4 + 6 and stats.hits == stats.passes * len(engine.cache.order)


def test_static_cache_buckets():
    from offload_engine.runtime.kv_static import static_cache_tokens

    assert static_cache_tokens(1) == 256
    assert static_cache_tokens(256) == 256
    assert static_cache_tokens(257) == 512
    assert static_cache_tokens(300, limit=400) == 400  # never past the model's context
    assert static_cache_tokens(500, limit=400) == 500  # ...nor below what is needed


def test_static_quantized_cache_matches_the_growing_one():
    """Prefill then single-token steps: the static int8 cache's dequantized keys and values
    over the written positions equal runtime/kv_cache.py's, and the rest is zero."""
    from offload_engine.planning.kv_sizes import KVLayout
    from offload_engine.runtime.kv_cache import QuantizedKVCache
    from offload_engine.runtime.kv_static import StaticQuantizedKVCache

    layout = KVLayout("k8v4", num_layers=1, kv_heads=2, head_dim=64, dense_itemsize=4)
    static, growing = StaticQuantizedKVCache(layout, 256), QuantizedKVCache(layout)
    torch.manual_seed(0)
    for tokens in (5, 1, 1):
        k, v = torch.randn(1, 2, tokens, 64), torch.randn(1, 2, tokens, 64)  # (B, H, T, D)
        sk, sv = static.layers[0].update(k, v)
        gk, gv = growing.layers[0].update(k, v)
        held = gk.shape[2]
        assert sk.shape == (1, 2, 256, 64)
        torch.testing.assert_close(sk[:, :, :held], gk, rtol=0, atol=0)
        torch.testing.assert_close(sv[:, :, :held], gv, rtol=0, atol=0)
        assert not sk[:, :, held:].any()
    assert int(static.get_seq_length()) == 7


def test_compile_mode_uses_cuda_graphs_only_on_cuda_when_nothing_streams():
    from offload_engine.runtime.compile_step import compile_config, compile_mode

    assert compile_mode(torch.device("cuda", 0), streams=False) == "reduce-overhead"
    assert compile_mode(torch.device("cuda", 0), streams=True) == "default"
    assert compile_mode(torch.device("cpu"), streams=False) == "default"
    config = compile_config(torch.device("cpu"), streams=False)
    assert config.fullgraph and config.dynamic is False and config._compile_all_devices


def test_compile_refuses_speculation():  # serve --compile: tests/test_serve_compile.py
    from offload_engine.errors import ConfigError
    from offload_engine.runtime.config import EngineConfig

    with pytest.raises(ConfigError, match="--compile does not combine with --speculate"):
        EngineConfig(compile=True, speculate="lookup")


def test_without_compile_nothing_compiles(qwen2_q):
    from offload_engine.runtime.compile_step import compilations, compile_seconds

    before = compilations(), compile_seconds()
    result, _ = _tokens(qwen2_q, False, 3)
    assert (compilations(), compile_seconds()) == before
    assert result.stats.compile_seconds == 0.0 and "compiled" not in result.stats.line()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_resident_decode_is_captured_with_cuda_graphs(qwen2_q):
    from offload_engine import load

    eager = _tokens(qwen2_q, False, 12, device="cuda:0", dtype="float32")[0].token_ids
    with load(qwen2_q, progress=False, device="cuda:0", dtype="float32", compile=True) as e:
        assert e.compile_config().mode == "reduce-overhead"  # all resident: CUDA graphs
        assert e.generate(PROMPT, greedy=True, max_new_tokens=12).token_ids == eager
    with load(qwen2_q, progress=False, device="cuda:0", dtype="float32", compile=True,
              gpu_budget=STREAMING) as e:
        assert e.compile_config().mode == "default"  # a streamed slot's address changes


def test_compile_refuses_parts_placed_on_the_cpu(qwen2_q):
    """The compiled step holds device-cache linears only; a CPU-placed part is refused at
    load with both flags named, not traced into the graph."""
    from offload_engine.decode.api import load
    from offload_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="--placement cpu"):
        load(qwen2_q, device="cpu", progress=False, compile=True, placement="cpu")
