"""Names on the hub's `/metrics` page that readers outside the hub (the bench, benchmarks,
tests) look up. The hub's metrics module defines each series under these names.

These are sample names as the page writes them (a counter's `_total`, a summary's `_count`);
`specedge_bench.metrics.MetricsPage` reads them, summed over any label not asked for (a hub with
several workers labels its series `worker="<id>"`).
"""

from __future__ import annotations

PREFIX = "specedge_"

VERIFY_PASSES = PREFIX + "verify_passes_total"  # labelled by sessions="N"
VERIFY_PASS_SECONDS = PREFIX + "verify_pass_seconds_total"  # labelled by sessions="N"
DEVICE_BUSY_SECONDS = PREFIX + "device_busy_seconds_total"
PREFILL_SECONDS = PREFIX + "prefill_seconds_total"
VERIFY_CONTEXT_TOKENS = PREFIX + "verify_context_tokens_total"
HUB_DRAFT_SECONDS = PREFIX + "hub_draft_seconds_total"
MERGE_WAITS = PREFIX + "merge_waits_total"
MERGE_WAIT_SECONDS = PREFIX + "merge_wait_seconds_total"
ACTIVE_SESSIONS = PREFIX + "active_sessions"
BATCHES = PREFIX + "batches_total"  # forward passes run for verifies
VERIFY_REQUESTS = PREFIX + "verify_seconds_count"  # verify requests answered (the summary's count)
PASS_FIXED_SECONDS = PREFIX + "pass_fixed_seconds"  # the fitted fixed part of a pass
PASS_TOKEN_SECONDS = PREFIX + "pass_token_seconds"  # the fitted cost of a token in a pass
USER_RETURN_SECONDS = PREFIX + "user_return_seconds"
EMITTED_TOKENS = PREFIX + "emitted_tokens_total"  # labelled by mode="..."
QUEUE_DEPTH = PREFIX + "queue_depth"
KV_BYTES = PREFIX + "kv_bytes"
KV_BYTES_RESERVED = PREFIX + "kv_bytes_reserved"
BATCH_SIZE_LAST = PREFIX + "batch_size_last"
TOKENS_PER_VERIFY = PREFIX + "tokens_per_verify"
PAST_KV_BYTES_COPIED = PREFIX + "past_kv_bytes_copied_total"
