"""What one batched pass of the hub's runner costs, by sessions in the pass: measured, not fitted.

    .venv/bin/python benchmarks/verify_cost.py --target MODEL [--device auto] [--sessions 1,2,4,8,16,32,64]
        [--draft-tokens 8] [--context 128] [--repeats 10] [--json FILE]

For each N it opens N KV slots on the hub's own `ModelRunner` (no HTTP), fills each with a
context of `--context` tokens, and times two kinds of pass over all N sessions, each the median
of `--repeats` passes after one warm-up:
- a one-token pass: each session's last token alone, the step of autoregressive decoding;
- a verify pass: the last token plus a chain draft of `--draft-tokens` tokens, SpecEdge's step.
Contexts are reset after each pass, so every pass sees the same lengths. Draft tokens are random
(what a pass costs does not depend on what it accepts).

It prints, for each N, both costs, the verify pass against one session's verify pass (the GPU
target: 8 sessions under 2x one), and the bound of `hub_server bench`: tokens per verify
(`--tokens-per-verify`, from a bench run) x one-token pass / verify pass at that load.
"""

from __future__ import annotations

import argparse
import json

from hub_server.engine.probe import PassProbe


def profile(probe: PassProbe, sessions: int) -> None:
    """Print the operators one verify pass spends its host time on, and how many device kernels
    it launches: on a GPU a small target's pass is bound by launching kernels, not running them."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if probe.runner.device == "cuda" else [])
    probe.pass_ms(sessions, probe.draft_tokens, 2)  # warm
    with torch_profile(activities=activities) as prof:
        probe.pass_ms(sessions, probe.draft_tokens, 1)  # a warm-up and one pass: two passes
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    operators = sum(e.count for e in events if e.key.startswith("aten::"))
    print(
        f"profile of two verify passes of {sessions} sessions: {operators} torch operators, {launches} kernel launches"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="a .gguf file or a Hugging Face model folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sessions", default="1,2,4,8,16,32,64")
    parser.add_argument("--draft-tokens", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--tokens-per-verify",
        type=float,
        default=0.0,
        help="tokens a verify emits (from hub_server bench); 0 leaves the bound out",
    )
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one verify pass of N sessions: where its time goes, by operator",
    )
    args = parser.parse_args()

    counts = [int(n) for n in args.sessions.split(",")]
    probe = PassProbe(
        args.target, device=args.device, sessions=max(counts), context=args.context, draft_tokens=args.draft_tokens
    )
    runner = probe.runner

    rows = []
    for n in counts:
        one, verify = probe.pass_pair_ms(n, args.draft_tokens, args.repeats)
        rows.append({"sessions": n, "one_token_pass_ms": round(one, 3), "verify_pass_ms": round(verify, 3)})
    single = rows[0]["verify_pass_ms"] if counts[0] == 1 else None

    print(
        f"target {runner.name} on {runner.device} ({runner.model.dtype}), context {args.context}, "
        f"chain draft {args.draft_tokens} (+1 context token per session), median of {args.repeats}"
    )
    print(f"{'sessions':>8} {'1-token ms':>11} {'verify ms':>10} {'verify/1 session':>17} {'bound':>7}")
    for row in rows:
        versus = f"{row['verify_pass_ms'] / single:.2f}x" if single else "-"
        if args.tokens_per_verify:
            row["bound_throughput_vs_autoregressive"] = round(
                args.tokens_per_verify * row["one_token_pass_ms"] / row["verify_pass_ms"], 3
            )
        bound = f"{row['bound_throughput_vs_autoregressive']:.2f}x" if args.tokens_per_verify else "-"
        print(
            f"{row['sessions']:>8} {row['one_token_pass_ms']:>11.2f} {row['verify_pass_ms']:>10.2f} "
            f"{versus:>17} {bound:>7}"
        )
    if args.profile:
        profile(probe, args.profile)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"config": vars(args) | {"device": runner.device, "dtype": str(runner.model.dtype)}, "rows": rows},
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
