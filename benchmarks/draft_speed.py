"""Drafting speed of `specedge`'s draft engine against raw llama-cpp-python, side by side.

    .venv/bin/python benchmarks/draft_speed.py --model DRAFT.gguf [-n 128] [-r 5] [-t 2]

Both decode the same n tokens greedily after the same one-token prompt, with the same thread
count; repetitions alternate between the two so machine noise hits both alike. The engine drafts
as a chat does (chains of at most its node budget), and both must return exactly n tokens.
`specedge bench --compare-raw` prints the same comparison as table rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from specedge_cli.commands.bench import RawDecoder, draft_tokens
from specedge_cli.drafting.engine import DraftEngine


def timed(run, n: int) -> float:
    started = time.perf_counter()
    made = run(n)
    assert made == n, f"decoded {made} tokens, not {n}"
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-r", type=int, default=5)
    parser.add_argument("-t", type=int, default=2)
    args = parser.parse_args()
    raw = RawDecoder(args.model, args.t, n_ctx=1024)
    engine = DraftEngine(args.model, n_ctx=1024, n_threads=args.t)
    timed(raw.decode, 8), timed(lambda n: draft_tokens(engine, n), 8)  # warm up both
    theirs, ours = [], []
    for _ in range(args.r):
        theirs.append(timed(raw.decode, args.n))
        ours.append(timed(lambda n: draft_tokens(engine, n), args.n))
    print(f"raw llama-cpp-python tg{args.n}: {statistics.fmean(theirs):.2f} ± {statistics.stdev(theirs):.2f} t/s")
    print(f"specedge draft engine tg{args.n}: {statistics.fmean(ours):.2f} ± {statistics.stdev(ours):.2f} t/s")
    print(f"ratio: {statistics.fmean(ours) / statistics.fmean(theirs):.3f}")


if __name__ == "__main__":
    main()
