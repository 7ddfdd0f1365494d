"""The pure math of the better quantizers: per-group range search and AWQ scale search."""

import pytest
import torch

from offload_engine.errors import ConfigError, QuantizationError
from offload_engine.quant import layout
from offload_engine.quant.awq import ScaleSearchSettings, scales_for, search_scales
from offload_engine.quant.layout import QuantSpec
from offload_engine.quant.quantize import dequantize_weight, quantize_weight
from offload_engine.quant.search import SearchSettings, search_quantize


def _weight(rows=96, cols=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight[:, 7] *= 12  # an outlier column stretches round-to-nearest's range
    return weight


def _weighted_error(weight, quantized, importance):
    return float(((dequantize_weight(quantized) - weight).square() * importance).sum())


@pytest.mark.parametrize("scheme", layout.SCHEMES)
@pytest.mark.parametrize("group", [32, 128])
def test_search_never_loses_to_round_to_nearest(scheme, group):
    weight, spec = _weight(), QuantSpec(scheme, group)
    ones = torch.ones(weight.shape[1])
    searched = search_quantize(weight, spec)
    rtn_error = _weighted_error(weight, quantize_weight(weight, spec), ones)
    # ratio 1.0 is on the grid, but the bf16 scale is rounded to nearest instead of up, so
    # allow a hair; on this weight the search must win clearly for the 4-bit schemes
    assert _weighted_error(weight, searched, ones) <= rtn_error * 1.001
    if scheme != "int8":
        assert _weighted_error(weight, searched, ones) < rtn_error * 0.95


@pytest.mark.parametrize("scheme", ["int4", "int4-asym", "int8"])
def test_search_output_uses_the_shared_layout(scheme):
    weight, spec = _weight(cols=200), QuantSpec(scheme, 64)
    searched = search_quantize(weight, spec)
    reference = quantize_weight(weight, spec)
    for part, value in reference.components().items():
        got = searched.components()[part]
        assert got.shape == value.shape and got.dtype == value.dtype, part
    restored = dequantize_weight(searched)
    assert restored.shape == weight.shape
    # every element is within one step of its scale (the search may clip, never wildly)
    steps = searched.scales.to(torch.float32).repeat_interleave(64, dim=1)[:, :200]
    clipped_by_at_most = (restored - weight).abs() / steps
    assert float(clipped_by_at_most.median()) <= 0.5


def test_importance_moves_the_error_to_unimportant_channels():
    weight, spec = _weight(), QuantSpec("int4-asym", 128)
    importance = torch.ones(weight.shape[1])
    importance[:150] = 100.0
    plain = search_quantize(weight, spec)
    weighted = search_quantize(weight, spec, importance)
    assert _weighted_error(weight, weighted, importance) < _weighted_error(weight, plain,
                                                                           importance)


def test_search_rejects_bad_inputs():
    spec = QuantSpec("int4", 64)
    with pytest.raises(QuantizationError, match="importance has shape"):
        search_quantize(torch.randn(4, 64), spec, torch.ones(63))
    with pytest.raises(QuantizationError, match="non-finite"):
        search_quantize(torch.full((4, 64), float("nan")), spec)
    with pytest.raises(ConfigError):
        SearchSettings(steps=0)
    with pytest.raises(ConfigError):
        SearchSettings(min_ratio=0.0)


def test_awq_scales_are_normalised_and_alpha_zero_is_identity():
    mean = torch.tensor([0.01, 0.1, 1.0, 10.0])
    assert torch.allclose(scales_for(mean, 0.0), torch.ones(4))
    scales = scales_for(mean, 0.5)
    assert torch.isclose(scales.max() * scales.min(), torch.tensor(1.0))
    assert bool((scales[1:] > scales[:-1]).all())


def test_awq_search_beats_no_scaling_when_a_channel_dominates():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(512, 128, generator=generator)
    inputs[:, :4] *= 30  # a few salient input channels, as in real activations
    weights = [torch.randn(64, 128, generator=generator) * 0.05,
               torch.randn(32, 128, generator=generator) * 0.05]
    spec = QuantSpec("int4-asym", 128)

    def rtn(weight):
        return dequantize_weight(quantize_weight(weight, spec))

    result = search_scales(inputs, inputs.abs().mean(0), weights, rtn, ScaleSearchSettings(10))
    assert result.alpha > 0
    assert result.error < result.baseline_error * 0.8
    assert result.scales.shape == (128,)
    with pytest.raises(QuantizationError, match="does not take"):
        search_scales(inputs, inputs.abs().mean(0), [torch.randn(8, 64)], rtn)
