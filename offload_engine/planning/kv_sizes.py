"""Bytes the KV cache takes per token, in each --kv-cache mode.

The planner and the runtime cache (runtime/kv_cache.py) both size the cache with
:class:`KVLayout`, so the planner's figure and the bytes the runtime allocates agree.

``bf16`` is the unquantized cache in the model's compute dtype (bfloat16 on CUDA; on CPU
the compute dtype is float32, so "bf16" there means float32). ``int8``, ``int4`` and
``k8v4`` (keys int8, values int4) store,
for every token and KV head, one unsigned code per element of the head dimension (int4:
two per byte) plus a float16 scale and a float16 minimum per group of ``group_size``
elements of the head dimension. Attention reads one layer at a time, dequantized into a
scratch buffer shared by all layers: that scratch (one layer's K and V in the compute
dtype) is counted too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# --kv-cache choices. k8v4: keys int8, values int4, because keys are the sensitive half
# (docs/quality.md: K int8 / V int4 costs a tenth of the KL of V int8 / K int4).
KV_CACHE_MODES = ("bf16", "int8", "k8v4", "int4")
KV_BITS = {"int8": (8, 8), "k8v4": (8, 4), "int4": (4, 4),
           "k4v8": (4, 8)}  # (key bits, value bits); k4v8 only to measure the other split
KV_GROUP_SIZE = 32  # elements of the head dim per scale/minimum pair (docs/quality.md)
SCALE_BYTES = 2  # float16 scale, and float16 minimum, per group
KV_CHUNK_TOKENS = 256  # the quantized cache grows by this many tokens at a time


def check_kv_mode(mode: str) -> str:
    if mode not in KV_CACHE_MODES:
        raise ConfigError(f"unknown --kv-cache {mode!r}: use {', '.join(KV_CACHE_MODES)}")
    return mode


@dataclass(frozen=True)
class KVLayout:
    """How one model's KV cache is stored in one mode; every size the cache needs."""

    mode: str  # bf16 (the compute dtype, unquantized), or a key of KV_BITS
    num_layers: int  # attention layers, each with a K and a V cache
    kv_heads: int
    head_dim: int
    dense_itemsize: int  # bytes of one element in the compute dtype
    group: int = KV_GROUP_SIZE  # preferred group size (see group_size); tools/ sweep it

    def __post_init__(self) -> None:
        if self.mode != "bf16" and self.mode not in KV_BITS:
            check_kv_mode(self.mode)  # raises, naming the flag's choices
        if self.group < 2 or self.group % 2:
            raise ConfigError(f"KV group size must be even and at least 2, got {self.group}")
        if self.quantized and 4 in KV_BITS[self.mode] and self.head_dim % 2:
            raise ConfigError(f"--kv-cache {self.mode} packs two 4-bit codes per byte: "
                              f"head_dim {self.head_dim} is odd; use --kv-cache int8")

    @property
    def quantized(self) -> bool:
        return self.mode in KV_BITS

    def bits_of(self, side: str) -> int:
        """Bits per code of ``side`` ("keys" or "values")."""
        key_bits, value_bits = KV_BITS[self.mode]
        return key_bits if side == "keys" else value_bits

    @property
    def group_size(self) -> int:
        """``group`` when it divides the head dim, else the whole head dim (one group)."""
        return self.group if self.head_dim % self.group == 0 else self.head_dim

    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size

    def code_bytes_of(self, side: str) -> int:
        """Bytes of codes for one token of one head on ``side``."""
        return self.head_dim * self.bits_of(side) // 8

    def head_token_bytes(self) -> int:
        """K and V of one token of one head, scales and minimums included."""
        if not self.quantized:
            return 2 * self.head_dim * self.dense_itemsize
        metadata = 2 * SCALE_BYTES * self.groups  # scale and minimum per group
        return sum(self.code_bytes_of(side) + metadata for side in ("keys", "values"))

    def layer_token_bytes(self) -> int:
        """K and V of one token in one layer, all KV heads."""
        return self.kv_heads * self.head_token_bytes()

    def token_bytes(self) -> int:
        """K and V of one token of one sequence, all layers: the per-token figure."""
        return self.num_layers * self.layer_token_bytes()

    def scratch_bytes(self, tokens: int, batch: int = 1) -> int:
        """The dequantized K and V of one layer at ``tokens`` (0 for the dense cache)."""
        if not self.quantized:
            return 0
        return 2 * batch * self.kv_heads * tokens * self.head_dim * self.dense_itemsize

    def cache_bytes(self, tokens: int, batch: int = 1) -> int:
        """Everything the cache holds at ``tokens`` per sequence: storage plus scratch."""
        return self.token_bytes() * tokens * batch + self.scratch_bytes(tokens, batch)

    def step_traffic_bytes(self, tokens: int, batch: int = 1) -> int:
        """Device memory traffic of one decode step's attention reads at ``tokens``.

        The dense cache is read once. A quantized one is read once as stored, then each
        layer is written to the scratch dequantized and read back by attention: until a
        fused kernel reads the codes directly, int8/int4 save memory, not bandwidth.
        """
        stored = self.token_bytes() * tokens * batch
        if not self.quantized:
            return stored
        dense = self.num_layers * self.scratch_bytes(tokens, batch)
        return stored + 2 * dense

    def max_tokens(self, budget: int, batch: int = 1) -> int:
        """The longest context (per sequence) whose cache fits ``budget`` bytes."""
        per_token = self.cache_bytes(1, batch)
        return budget // per_token if per_token else 0


def kv_layout_for(shape, mode: str, dense_itemsize: int) -> KVLayout:
    """The layout of a ModelShape's cache (anything with num_layers, kv_heads, head_dim)."""
    return KVLayout(mode, shape.num_layers, shape.kv_heads, shape.head_dim, dense_itemsize)
