"""The KV cache keyword follows the installed transformers (model/cache_arg.py)."""

import torch

from offload_engine.model.cache_arg import cache_kwargs, cache_name, output_cache


class _NewForward(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None):
        return {"cache": cache}


class _OldForward(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        return {"past_key_values": past_key_values}


class _Output:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_name_follows_the_forward_signature():
    assert cache_name(_NewForward()) == "cache"
    assert cache_name(_OldForward()) == "past_key_values"
    marker = object()
    assert cache_kwargs(_NewForward(), marker) == {"cache": marker}
    assert cache_kwargs(_OldForward(), marker) == {"past_key_values": marker}
    assert cache_kwargs(_NewForward(), None) == {}


def test_output_cache_reads_either_field():
    marker = object()
    assert output_cache(_Output(cache=marker)) is marker
    assert output_cache(_Output(past_key_values=marker)) is marker
    assert output_cache(_Output(cache=None, past_key_values=marker)) is marker


def test_stock_model_round_trip_without_deprecation(tmp_path):
    """A real transformers model takes the cache by our name and returns it (warnings are
    errors for past_key_values in pyproject's filterwarnings)."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        first = model(input_ids=ids, use_cache=True)
        past = output_cache(first)
        assert past is not None and past.get_seq_length() == 3
        step = model(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(model, past))
    assert output_cache(step).get_seq_length() == 4
