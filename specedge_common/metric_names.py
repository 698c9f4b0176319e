"""Names on the hub's `/metrics` page that readers outside the hub (the bench, benchmarks,
tests) look up. The hub's metrics module defines each series under these names."""

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
