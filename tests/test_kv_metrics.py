"""What operators see of the paged KV pool: blocks in use, cached and shared, prefix hits and the
tokens they saved, on /metrics and /v1/workers. A real hub on loopback."""

from __future__ import annotations

import httpx

from specedge_bench.metrics import MetricsPage
from tests.conftest import RunningHub
from tests.test_hub_abuse import open_session

BLOCK = 16


def test_blocks_and_shared_prefixes_are_counted_for_operators(tiny, tmp_path):
    hub = RunningHub(tiny.hf_dir, tmp_path)
    try:
        with httpx.Client(base_url=hub.url, timeout=60) as client:
            prefix = [(7 * i) % 400 + 3 for i in range(3 * BLOCK + 5)]  # three full blocks and a part
            sessions = [open_session(client) for _ in range(2)]
            for session, tail in zip(sessions, ([11, 12], [13, 14])):
                answer = client.post(f"/v1/sessions/{session}/feed", json={"tokens": prefix + tail})
                assert answer.status_code == 200, answer.text
            page = MetricsPage.parse(client.get("/metrics").text)
            workers = client.get("/v1/workers").json()["workers"]
    finally:
        hub.stop()
    assert page.value("specedge_prefix_hits_total") >= 3  # the second session took the first's blocks
    assert page.value("specedge_prefix_tokens_reused_total") >= 3 * BLOCK
    assert page.value("specedge_kv_blocks_shared") >= 3
    assert 0 < page.value("specedge_kv_blocks_used") < page.value("specedge_kv_blocks")
    assert workers[0]["kv_blocks"] == page.value("specedge_kv_blocks")
    assert workers[0]["kv_blocks_used"] == page.value("specedge_kv_blocks_used")
