"""Drafting speed of `specedge`'s draft engine against raw llama-cpp-python, side by side.

    .venv/bin/python benchmarks/draft_speed.py --model DRAFT.gguf [-n 128] [-r 5] [-t 2]

Both decode the same n tokens greedily one at a time after the same one-token prompt, with the
same thread count; repetitions alternate between the two so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np

from specedge_cli.drafting.engine import DraftEngine


def raw_speed(llm: llama_cpp.Llama, n: int) -> float:
    llm.reset()
    started = time.perf_counter()
    llm.eval([llm.token_bos()])
    for _ in range(n - 1):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
    return n / (time.perf_counter() - started)


def engine_speed(engine: DraftEngine, n: int) -> float:
    engine.reset()
    started = time.perf_counter()
    engine.draft([engine.bos_token_id], n)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-r", type=int, default=5)
    parser.add_argument("-t", type=int, default=2)
    args = parser.parse_args()
    llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=1024, n_threads=args.t, logits_all=False, verbose=False)
    engine = DraftEngine(args.model, n_ctx=1024, n_threads=args.t)
    raw_speed(llm, 8), engine_speed(engine, 8)  # warm up both
    raw, ours = [], []
    for _ in range(args.r):
        raw.append(raw_speed(llm, args.n))
        ours.append(engine_speed(engine, args.n))
    print(f"raw llama-cpp-python tg{args.n}: {statistics.fmean(raw):.2f} ± {statistics.stdev(raw):.2f} t/s")
    print(f"specedge draft engine tg{args.n}: {statistics.fmean(ours):.2f} ± {statistics.stdev(ours):.2f} t/s")
    print(f"ratio: {statistics.fmean(ours) / statistics.fmean(raw):.3f}")


if __name__ == "__main__":
    main()
