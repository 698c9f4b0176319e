"""What the target's vocabulary projection costs by the rows it computes, on this device.

    .venv/bin/python benchmarks/projection_rows.py --target gemma|PATH [--device cpu] [--threads 1] [--repeats 5]

The runner decides per level of a verify pass whether to project only the draft nodes it has
reached or every node left (`ModelRunner._choices`), from these costs; this prints them: the
best of `--repeats` calls at each row count, through the runner's own `_logits`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="gemma, or a .gguf file / model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 72, 144])
    args = parser.parse_args()
    import torch
    from verify_speed import resolve_target

    from hub_server.config import HubSettings
    from hub_server.engine.runner import ModelRunner

    torch.set_num_threads(args.threads)
    target = resolve_target(args.target, Path("/tmp/specedge-bench-targets"))
    runner = ModelRunner(HubSettings(model=target, device=args.device, max_sessions=1, max_context=256))
    width = runner.model.get_output_embeddings().weight.shape[1]
    hidden = torch.randn(max(args.rows), width).to(runner.device, runner.model.dtype)
    print(f"target {Path(target).name}, {args.device}, {args.threads} thread(s): best of {args.repeats} calls")
    one = None
    for rows in args.rows:
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            runner._logits(hidden, list(range(rows))).argmax(dim=-1).tolist()
            best = min(best, time.perf_counter() - started)
        one = one or best
        print(f"{rows:>5} rows {best * 1000:9.1f} ms  {best * 1000 / rows:8.2f} ms a row  {best / one:6.2f}x one row")


if __name__ == "__main__":
    main()
