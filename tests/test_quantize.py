"""Quantization as pure functions: error bounds, layout round trips, bad inputs."""

import pytest
import torch

from offload_engine.errors import ConfigError, QuantizationError
from offload_engine.quant import layout
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight, quantize_weight


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    packed = layout.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(layout.unpack_int4(packed), codes.to(torch.uint8))
    # element 2j in the low nibble, 2j+1 in the high nibble
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


@pytest.mark.parametrize("scheme,qmax", [("int4", 7), ("int8", 127)])
@pytest.mark.parametrize("group", layout.GROUP_SIZES)
def test_symmetric_error_is_at_most_half_a_step(scheme, qmax, group):
    weight = torch.randn(48, 300, generator=torch.Generator().manual_seed(1)) * 0.05
    quantized = quantize_weight(weight, QuantSpec(scheme, group))
    error = (dequantize_weight(quantized) - weight).abs()
    steps = quantized.scales.to(torch.float32).repeat_interleave(group, dim=1)[:, :300]
    assert bool((error <= steps / 2 * (1 + 1e-6)).all())
    # the stored scale never rounds below absmax/qmax (that would clip the largest element)
    padded = torch.nn.functional.pad(weight, (0, quantized.spec.padded_in(300) - 300))
    absmax = padded.reshape(48, -1, group).abs().amax(-1)
    assert bool((quantized.scales.to(torch.float32) * qmax >= absmax).all())


@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("group", layout.GROUP_SIZES)
def test_float_minimum_error_is_at_most_half_a_step(scale_dtype, group):
    """int4-min (what a GGUF Q4_1 import holds) quantizes the linears the file holds in
    another type: the minimum rounds down and the scale up, so nothing is clipped."""
    weight = torch.randn(48, 300, generator=torch.Generator().manual_seed(5)) * 0.05 + 0.3
    quantized = quantize_weight(weight, QuantSpec("int4-min", group, scale_dtype))
    assert quantized.zeros is None and quantized.mins.dtype == quantized.scales.dtype
    error = (dequantize_weight(quantized) - weight).abs()
    steps = quantized.scales.to(torch.float32).repeat_interleave(group, dim=1)[:, :300]
    assert bool((error <= steps / 2 * (1 + 1e-5)).all())
    padded = torch.nn.functional.pad(weight, (0, quantized.spec.padded_in(300) - 300))
    groups = padded.reshape(48, -1, group)
    mins, scales = quantized.mins.to(torch.float32), quantized.scales.to(torch.float32)
    assert bool((mins <= groups.amin(-1)).all())
    assert bool((mins + 15 * scales >= groups.amax(-1)).all())


def test_asymmetric_is_no_worse_on_shifted_weights():
    weight = torch.rand(64, 256, generator=torch.Generator().manual_seed(2)) * 0.1 + 0.3
    errors = {}
    for scheme in ("int4", "int4-asym"):
        quantized = quantize_weight(weight, QuantSpec(scheme, 128))
        errors[scheme] = (dequantize_weight(quantized) - weight).pow(2).mean().item()
    assert errors["int4-asym"] < errors["int4"] / 2


@pytest.mark.parametrize("scheme", layout.QUANTIZABLE_SCHEMES)
def test_all_zero_groups_round_trip_to_zero(scheme):
    weight = torch.zeros(8, 256)
    weight[:, 128:] = torch.linspace(-1, 1, 128)
    out = dequantize_weight(quantize_weight(weight, QuantSpec(scheme, 128)))
    assert torch.equal(out[:, :128], torch.zeros(8, 128))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 576), (7, 33), (130, 129)])
@pytest.mark.parametrize("scheme", layout.QUANTIZABLE_SCHEMES)
def test_odd_shapes_keep_true_size_and_layout(shape, scheme):
    spec = QuantSpec(scheme, 64)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.bfloat16)
    quantized = quantize_weight(weight, spec)
    for part, (expected_shape, dtype) in spec.component_shapes(*shape).items():
        tensor = quantized.components()[part]
        assert tuple(tensor.shape) == expected_shape and tensor.dtype == dtype
    assert quantized.nbytes == spec.nbytes(*shape)
    assert dequantize_weight(quantized).shape == shape


def test_chunked_quantization_equals_one_piece(monkeypatch):
    from offload_engine.quant import quantize

    weight = torch.randn(100, 200, generator=torch.Generator().manual_seed(4))
    specs = (QuantSpec("int4-asym", 32), QuantSpec("int4-min", 32, "fp16"))
    wholes = [quantize_weight(weight, spec) for spec in specs]
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 7 * 224)
    for spec, whole in zip(specs, wholes, strict=True):
        chunked = quantize_weight(weight, spec)
        assert whole.components().keys() == chunked.components().keys()
        for part, value in whole.components().items():
            assert torch.equal(value, chunked.components()[part])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise_naming_the_tensor(bad):
    weight = torch.randn(4, 64)
    weight[2, 5] = bad
    with pytest.raises(QuantizationError, match="layers.3.mlp.up_proj.weight"):
        quantize_weight(weight, QuantSpec(), name="layers.3.mlp.up_proj.weight")


def test_bad_specs_and_shapes_are_rejected():
    with pytest.raises(ConfigError, match="int4-asym"):
        QuantSpec("int3")
    with pytest.raises(ConfigError, match="group-size"):
        QuantSpec("int4", 100)
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_weight(torch.randn(4), QuantSpec(), name="x")
    with pytest.raises(QuantizationError, match="float"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), QuantSpec(), name="x")
