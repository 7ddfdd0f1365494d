"""Tiny random models and a real tokenizer for tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 512


def train_tokenizer(directory: Path):
    """A byte-level BPE with a 512-token vocabulary (the one synthetic models ship)."""
    from offload_engine.checkpoint.synth_tokenizer import train_tokenizer as train

    return train(directory, VOCAB_SIZE)


def tiny_config(arch: str = "qwen2", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    common.update(overrides)  # e.g. more or wider layers
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **common)
    if arch == "llama":
        # hidden 96 with group 64 exercises input-dim padding (96 -> 128)
        common.update(hidden_size=96, num_attention_heads=4, head_dim=24)
        return LlamaConfig(tie_word_embeddings=True, **common)
    if arch == "qwen3":  # per-head q/k norms, no q/k/v biases, explicit head_dim
        from transformers import Qwen3Config

        return Qwen3Config(tie_word_embeddings=False, head_dim=16, **common)
    if arch == "smollm3":  # Llama's layer layout; every 4th layer without rotary (NoPE)
        from transformers import SmolLM3Config

        return SmolLM3Config(tie_word_embeddings=True, **common)
    if arch == "ministral":  # Mistral's layout
        from transformers import MinistralConfig

        return MinistralConfig(tie_word_embeddings=False, head_dim=16, **common)
    raise ValueError(arch)


def make_checkpoint(directory: Path, arch: str = "qwen2", dtype=torch.bfloat16,
                    shards: int = 2, tokenizer_dir: Path | None = None, seed: int = 0,
                    config=None) -> Path:
    """Save a tiny random model as a Hugging Face safetensors directory.

    ``config`` replaces tiny_config(arch), e.g. for a model with more or wider layers."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = config or tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = total // shards + 1 if shards > 1 else total * 2
    model.save_pretrained(directory, max_shard_size=shard_size)
    GenerationConfig(bos_token_id=1, eos_token_id=0, pad_token_id=0).save_pretrained(directory)
    if tokenizer_dir is not None:
        for path in Path(tokenizer_dir).iterdir():
            (Path(directory) / path.name).write_bytes(path.read_bytes())
    return Path(directory)


IMPORT_PROMPT = "The class statement defines"
# tiny GGUF imports (tests/tiny_gguf.py) hold an untied int8 output, kept resident: their
# minimum budget is 372 KiB, so this streams the rest
GGUF_STREAMING_BUDGET = "384KiB"


def assert_engine_matches(directory: Path, reference, gpu_budget: str = "256KiB",
                          atol: float = 1e-5, greedy_tokens: int = 8) -> None:
    """The engine on quantized DIRECTORY against a transformers ``reference`` model: logits
    on IMPORT_PROMPT within ``atol`` and, when ``greedy_tokens``, the same greedy tokens.
    Both compute in float32 (the reference's dtype; on CPU auto would pick bfloat16)."""
    from offload_engine import load

    with load(directory, progress=False, gpu_budget=gpu_budget, dtype="float32") as engine, \
            torch.no_grad():
        ids = engine.tokenizer(IMPORT_PROMPT, return_tensors="pt")["input_ids"]
        torch.testing.assert_close(engine.model(ids).logits, reference(ids).logits,
                                   rtol=0, atol=atol)
        if not greedy_tokens:
            return
        greedy = engine.generate(IMPORT_PROMPT, greedy=True,
                                 max_new_tokens=greedy_tokens).token_ids
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=greedy_tokens)[0, ids.shape[1]:]
    assert greedy == expected.tolist()


MOE_ARCHS = ("qwen3_moe", "mixtral", "olmoe")


def tiny_moe_config(arch: str = "qwen3_moe", **overrides):
    """2 layers, hidden 64, 4 experts of which each token uses 2."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                  max_position_embeddings=256, initializer_range=0.3, bos_token_id=1,
                  eos_token_id=0, pad_token_id=0, num_experts_per_tok=2,
                  tie_word_embeddings=False)
    moe_intermediate_size = overrides.pop("moe_intermediate_size", 48)  # Qwen3-MoE's only
    common.update(overrides)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(num_experts=4, moe_intermediate_size=moe_intermediate_size,
                              head_dim=16, **common)
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=4, **common)
    if arch == "olmoe":
        return OlmoeConfig(num_experts=4, **common)
    raise ValueError(arch)


def dequantized_reference(src: Path, directory: Path):
    """The transformers model of SRC (loaded with transformers' own key conversion) holding
    the dequantized weights of the quantized DIRECTORY, experts included."""
    from transformers import AutoModelForCausalLM

    from offload_engine.model.experts import find_experts, split_expert_name
    from offload_engine.quant.quantize import dequantize_weight
    from offload_engine.runtime.store import HostStore

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    experts = find_experts(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in HostStore.load(directory, progress=False).items():
            dense = dequantize_weight(weight, torch.float32)
            found = split_expert_name(name, experts)
            if found is None:
                params[f"{name}.weight"].copy_(dense)
                continue
            info, matrix, expert = found
            param = params[f"{info.module_name}.{matrix.param}"]
            param[expert].copy_(dense.t() if matrix.transposed else dense)
    model.tie_weights()
    return model


def model_with_weights(src: Path, weights: dict, directory: Path):
    """The transformers model of SRC with ``weights`` (checkpoint key -> float tensor, e.g.
    a library's decompression of per-expert keys) in place of SRC's, loaded by
    transformers' own key conversion from a float32 checkpoint written to DIRECTORY."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    state = {}
    for shard in sorted(Path(src).glob("*.safetensors")):
        state.update(load_file(shard))
    unknown = sorted(set(weights) - set(state))
    assert not unknown, f"not keys of {src}: {unknown[:3]}"
    state.update(weights)
    directory = Path(directory)
    directory.mkdir(parents=True)
    save_file({k: v.float().contiguous() for k, v in state.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    for path in Path(src).iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            (directory / path.name).write_bytes(path.read_bytes())
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def moe_minimum_budget(directory: Path) -> int:
    """The smallest --gpu-budget a MoE directory loads with (one expert slot per layer),
    computing in float32 as assert_engine_matches does."""
    from offload_engine import load

    with load(directory, progress=False, dtype="float32") as engine:
        return engine.plan.minimum_budget + engine.stats["expert_minimum_bytes"]


# Architectures that once failed (issue 25), as tiny configs of transformers' own classes.
ARCH_OVERRIDES = {
    "gpt_neox": dict(num_key_value_heads=None),  # checkpoint keys renamed (embed_out)
    "gemma2": dict(head_dim=16),  # refuses sdpa: eager attention
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),  # nn.Linear router
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_group=1,
                        topk_group=1, num_key_value_heads=4),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16),
    "gemma4_text": dict(head_dim=16),  # per-layer head_dim
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention"]),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96,
                        head_dim=16),  # dense-call experts, nn.Linear router
}


def tiny_arch_config(arch: str):
    """A 2-layer, hidden-64 config of ``arch`` (a transformers model_type)."""
    from transformers import AutoConfig

    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                    max_position_embeddings=256, initializer_range=0.3, bos_token_id=1,
                    eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    settings.update(ARCH_OVERRIDES[arch])
    return AutoConfig.for_model(arch, **{k: v for k, v in settings.items() if v is not None})
