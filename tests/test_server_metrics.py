"""/metrics in Prometheus text format, read back with the reference parser."""

from __future__ import annotations

import pytest

from offload_engine.decode.api import load
from offload_engine.server.app import ServerConfig
from tests.test_server import TIMEOUT, LiveServer, httpx  # also skips without the extra

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def live(qwen2_q):
    with load(qwen2_q, device="cpu", progress=False) as engine, \
            LiveServer(engine, ServerConfig(max_batch=2)) as server:
        yield server


def _scrape(live) -> dict:
    response = httpx.get(f"{live.url}/metrics", timeout=TIMEOUT)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in parser.text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_parse_as_prometheus_text_and_count_requests(live):
    before = _scrape(live)
    model = live.service.model_id
    for _ in range(2):
        reply = httpx.post(f"{live.url}/v1/completions", timeout=TIMEOUT,
                           json={"model": model, "prompt": "A list", "max_tokens": 4})
        assert reply.status_code == 200
    after = _scrape(live)
    served = ("offload_engine_requests_total", (("outcome", "served"),))
    assert after[served] - before[served] == 2
    tokens = ("offload_engine_tokens_generated_total", ())
    assert after[tokens] - before[tokens] == 8
    for name in ("prefills_total", "prefill_passes_total"):  # one at a time: a pass each
        assert after[(f"offload_engine_{name}", ())] - before[(f"offload_engine_{name}", ())] == 2
    assert after[("offload_engine_model_info", (("model", model),))] == 1
    for name in ("queue_depth", "active_sequences", "decode_tokens_per_second",
                 "h2d_bytes_total", "cache_hit_rate", "stall_seconds_total",
                 "h2d_bytes_per_token"):
        assert (f"offload_engine_{name}", ()) in after, name
    for outcome in ("cancelled", "failed", "rejected"):
        assert ("offload_engine_requests_total", (("outcome", outcome),)) in after
    json_view = httpx.get(f"{live.url}/metrics/json", timeout=TIMEOUT).json()
    assert json_view["tokens_generated"] == after[tokens]
    assert json_view["prefill_passes"] == after[("offload_engine_prefill_passes_total", ())]
