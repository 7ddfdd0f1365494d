"""Synthetic quantized models: real shapes, seeded random weights, no download.

A synthetic directory loads and runs like a converted one, so its speed and memory are
real; its text is noise. It answers "how fast is a 32B model on my card?" without 65 GB
of weights. The manifest's source has ``kind = "synthetic"`` and `inspect`/`run` say so.

Random values come from fixed pools (a few MiB of seeded random bytes and normals) that
are copied tensor by tensor, so writing runs at memcpy and disk speed, and RAM stays
bounded by the shard buffer plus the largest tensor, whatever the model size. Scales
give weights a standard deviation of about 0.02 (a usual init range), which keeps a
deep random model's activations finite. Rows of the output layer past the tokenizer's
vocabulary get near-zero weights, so the greedy token is one the tokenizer can decode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model import architecture
from ..model.experts import find_experts
from ..model.model_shape import shape_from_config
from ..model.presets import preset_config
from ..quant.layout import INT4_CODE_MAX, QuantSpec
from ..units import format_bytes
from ..version import __version__
from . import checksums
from .convert import DEFAULT_SHARD_BYTES, ShardWriter
from .destination import check_replaceable, staged_output
from .format import MANIFEST_NAME, Manifest, TensorEntry
from .synth_tokenizer import train_tokenizer

logger = logging.getLogger(__name__)
SYNTHETIC_KIND = "synthetic"
TOKENIZER_VOCAB = 512  # the byte-level BPE shipped with every synthetic model
POOL_ELEMENTS = 1 << 22  # 4 Mi random values per pool: copied, never regenerated
TARGET_STD = 0.02  # standard deviation of the dequantized weights and the embedding
CODE_STD = {4: 4.61, 8: 73.9}  # std of uniform codes: sqrt((levels^2 - 1) / 12)
UNUSED_ROW_SCALE = 1e-3  # output rows past the tokenizer's vocabulary


@dataclass
class SynthRequest:
    """What to synthesize. ``layers``/``vocab_size`` shrink the model (tests, dry runs)."""

    model: str  # a built-in name (model/presets.py), a config.json or a directory with one
    spec: QuantSpec = field(default_factory=QuantSpec)
    layers: Optional[int] = None  # write only this many decoder layers (default: all)
    vocab_size: Optional[int] = None  # override the vocabulary (default: the model's)
    seed: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {self.layers}")
        if self.vocab_size is not None and self.vocab_size < 259:
            raise ConfigError(f"--vocab-size must be at least 259 (256 bytes and 3 special "
                              f"tokens), got {self.vocab_size}")
        if self.shard_bytes < 1:
            raise ConfigError("--shard-size must be positive")


@dataclass
class SynthSummary:
    """What `synth` wrote, and what the full model would take."""

    destination: Optional[Path]  # None for a dry run
    model: str
    spec: QuantSpec
    layers_written: int
    layers_full: int
    full_bytes: dict  # linear_layers, lm_head, dense: the whole model at this scheme
    written_bytes: int  # shards on disk (0 for a dry run)
    seconds: float

    def lines(self) -> list:
        full = self.full_bytes
        head = f"wrote {self.destination} (SYNTHETIC: random weights, real shapes)" \
            if self.destination else f"dry run: nothing written for {self.model}"
        return [head,
                f"  model {self.model}, scheme {self.spec.scheme}, group size "
                f"{self.spec.group_size}, {self.layers_written} of {self.layers_full} layers",
                f"  full model: linear weights in the layers {full['linear_layers'] / 1e9:.2f} "
                f"GB, lm_head {full['lm_head'] / 1e9:.2f} GB, dense {full['dense'] / 1e9:.2f} GB",
                f"  written: {format_bytes(self.written_bytes)} in {self.seconds:.1f} s"]


def resolve_config(model: str):
    """(transformers config, label) for a built-in name, a config.json or a directory."""
    from transformers import AutoConfig

    path = Path(model)
    if path.is_dir() or path.suffix == ".json":
        if not (path / "config.json" if path.is_dir() else path).is_file():
            raise ConfigError(f"{model}: no config.json there; give a built-in name or a "
                              "config.json")
        return AutoConfig.from_pretrained(path), str(path)
    data = preset_config(model)
    data.pop("architectures", None)
    return AutoConfig.for_model(data.pop("model_type"), **data), model.lower()


def shrink_config(hf_config, layers: Optional[int], vocab_size: Optional[int]):
    """A copy of the config with fewer layers and/or another vocabulary."""
    data = hf_config.to_dict()
    if layers is not None:
        layers = min(layers, hf_config.num_hidden_layers)
        data["num_hidden_layers"] = layers
        if isinstance(data.get("layer_types"), list):
            data["layer_types"] = data["layer_types"][:layers]
    if vocab_size is not None:
        data["vocab_size"] = vocab_size
    data["dtype"] = "bfloat16"  # how the dense tensors are stored
    return type(hf_config).from_dict(data)


def full_size(hf_config, spec: QuantSpec) -> dict:
    """Bytes of the whole model at ``spec``: the figures the planner sizes."""
    shape = shape_from_config(hf_config, spec, "synth")
    lm_head = sum(spec.nbytes(lin.out_features, lin.in_features)
                  for lin in shape.linears if lin.is_lm_head)
    linear = sum(spec.nbytes(lin.out_features, lin.in_features) for lin in shape.linears)
    if shape.experts is not None:  # each expert's matrices are quantized linears too
        experts = shape.experts
        linear += (len(experts.layers) * experts.num_experts
                   * sum(spec.nbytes(out, inp) for out, inp in experts.matrices))
    return {"linear_layers": linear - lm_head, "lm_head": lm_head,
            "dense": (shape.embedding_elements + shape.other_dense_elements) * 2}


def is_synthetic(manifest: Manifest) -> bool:
    return manifest.source.get("kind") == SYNTHETIC_KIND


def synthetic_note(manifest: Manifest) -> Optional[str]:
    """One line for `inspect` and `run`, or None for a real model."""
    if not is_synthetic(manifest):
        return None
    source = manifest.source
    return (f"SYNTHETIC model ({source.get('model')}, seed {source.get('seed')}, "
            f"{source.get('layers')} of {source.get('full_layers')} layers): random weights, "
            "real shapes; its speed and memory are real, its text is noise")


class RandomPool:
    """Seeded random bytes and normals, handed out in rotating slices (memcpy speed)."""

    def __init__(self, seed: int, elements: int = POOL_ELEMENTS):
        generator = torch.Generator().manual_seed(seed)
        self.bytes = torch.randint(0, 256, (elements,), dtype=torch.uint8, generator=generator)
        self.normal = torch.randn(elements, generator=generator).to(torch.bfloat16)
        self.offset = 0

    def take(self, source: torch.Tensor, shape) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        out = torch.empty(numel, dtype=source.dtype)
        done, start = 0, self.offset
        while done < numel:
            count = min(numel - done, source.numel() - start)
            out[done:done + count] = source[start:start + count]
            done, start = done + count, 0
        self.offset = (self.offset + 7919) % source.numel()  # the next tensor starts elsewhere
        return out.view(shape)


def random_components(pool: RandomPool, spec: QuantSpec, out_features: int,
                      in_features: int, live_rows: Optional[int] = None) -> dict:
    """qweight/scales(/zeros) of one weight; rows from ``live_rows`` on get tiny scales."""
    shapes = spec.component_shapes(out_features, in_features)
    parts = {}
    for name, (shape, dtype) in shapes.items():
        raw = pool.take(pool.bytes, shape)
        if name == "qweight":
            parts[name] = raw.view(dtype)  # int8 reads the same bytes as signed values
        elif name == "zeros":  # near the middle of the code range, as real zero points are
            parts[name] = (raw % 3 + (INT4_CODE_MAX // 2)).to(dtype)
        else:  # scales: TARGET_STD / code std, times 0.5-1.5
            base = TARGET_STD / CODE_STD[spec.bits]
            scales = base * (0.5 + raw.to(torch.float32) / 255)
            if live_rows is not None:
                scales[live_rows:] *= UNUSED_ROW_SCALE
            parts[name] = scales.to(dtype)
    return parts


def random_dense(pool: RandomPool, role: str, shape, live_rows: Optional[int]) -> torch.Tensor:
    if role == "norm":
        return torch.ones(shape, dtype=torch.bfloat16)
    if role == "bias":
        return torch.zeros(shape, dtype=torch.bfloat16)
    values = pool.take(pool.normal, shape) * TARGET_STD
    if role == "embedding" and live_rows is not None:
        values[live_rows:] = 0  # a tied output layer then scores only decodable ids
    return values


def synthesize(request: SynthRequest, dst: Optional[Path], force: bool = False,
               progress: bool = True) -> SynthSummary:
    """Write a synthetic quantized directory at ``dst`` (None: size it only, a dry run)."""
    started = time.perf_counter()
    full_config, label = resolve_config(request.model)
    config = shrink_config(full_config, request.layers, request.vocab_size)
    full = full_size(full_config, request.spec)  # what the real model takes, overrides aside
    summary = SynthSummary(None, label, request.spec, config.num_hidden_layers,
                           full_config.num_hidden_layers, full, 0, 0.0)
    if dst is None:
        summary.seconds = time.perf_counter() - started
        return summary
    dst = Path(dst)
    check_replaceable(dst, force)
    with staged_output(dst, f"synthesizing {label}") as tmp:
        manifest = _write_tensors(config, request, tmp, progress)
        manifest.source = {"kind": SYNTHETIC_KIND, "synthetic": True, "model": label,
                           "seed": request.seed, "layers": config.num_hidden_layers,
                           "full_layers": full_config.num_hidden_layers,
                           "model_type": getattr(config, "model_type", None),
                           "path": f"synthetic:{label}"}
        _write_side_files(config, tmp)
        manifest.checksums = checksums.record(tmp, manifest.shards)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    summary.destination = dst
    summary.written_bytes = sum(manifest.shards.values())
    summary.seconds = time.perf_counter() - started
    return summary


def _write_tensors(config, request: SynthRequest, tmp: Path, progress: bool) -> Manifest:
    skeleton = architecture.build_skeleton(config)
    linears = architecture.find_linears(skeleton, config)
    output = skeleton.get_output_embeddings()
    tied = architecture.ties_embeddings(config)
    expert_params = {f"{experts_module}.{m.param}": (info, m)
                     for experts_module, info in find_experts(skeleton).items()
                     for m in info.matrices}
    live_rows = min(TOKENIZER_VOCAB, config.vocab_size)
    pool, writer = RandomPool(request.seed), ShardWriter(tmp, request.shard_bytes)
    manifest = Manifest(scheme=request.spec.scheme, group_size=request.spec.group_size,
                        source={}, created_by=f"offload-engine {__version__} synth")
    params = [(n, p) for n, p in skeleton.named_parameters()
              if not (tied and output is not None and p is output.weight
                      and n.rsplit(".", 1)[0] not in linears)]
    bar = tqdm(total=sum(p.numel() for _, p in params), unit="param", unit_scale=True,
               desc="synthesizing", disable=not progress)
    with bar:
        for name, param in params:
            module = name.rsplit(".", 1)[0]
            info = linears.get(module) if name.endswith(".weight") else None
            if name in expert_params:  # one quantized entry per expert
                manifest.tensors.update(_expert_entries(name, expert_params[name], pool,
                                                        request.spec, writer))
                bar.update(param.numel())
                continue
            if info is not None:
                parts = random_components(pool, request.spec, info.out_features,
                                          info.in_features,
                                          live_rows if info.is_lm_head else None)
                entry = TensorEntry("lm_head" if info.is_lm_head else "linear",
                                    list(param.shape), "BF16",
                                    {part: writer.add(f"{name}.{part}", value)
                                     for part, value in parts.items()})
            else:
                role = architecture.dense_role(skeleton, name)
                value = random_dense(pool, role, tuple(param.shape), live_rows)
                entry = TensorEntry(role, list(param.shape), "BF16",
                                    {"dense": writer.add(name, value)})
            manifest.tensors[name] = entry
            bar.update(param.numel())
    writer.flush()
    manifest.shards = dict(writer.shards)
    return manifest


def _expert_entries(name: str, found, pool, spec: QuantSpec, writer) -> dict:
    info, matrix = found
    entries = {}
    for expert in range(info.num_experts):
        weight = f"{info.weight_module(matrix.param, expert)}.weight"
        parts = random_components(pool, spec, matrix.out_features, matrix.in_features)
        entries[weight] = TensorEntry("expert", [matrix.out_features, matrix.in_features],
                                      "BF16", {part: writer.add(f"{weight}.{part}", value)
                                               for part, value in parts.items()})
    return entries


def _write_side_files(config, tmp: Path) -> None:
    """config.json, generation_config.json and a small byte-level tokenizer."""
    from transformers import GenerationConfig

    tokenizer = train_tokenizer(tmp, min(TOKENIZER_VOCAB, config.vocab_size))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
