"""A `--tensor-parallel 2` hub on this machine's CPU, asked by three `specedge chat` replies at once.

    .venv/bin/python benchmarks/tensor_parallel_chat.py --target TARGET.gguf --draft DRAFT.gguf [--cache-dir DIR] [--tokens 40]

Starts `hub_server serve --tensor-parallel 2 --device cpu` (Ray, two gloo ranks), runs three
`specedge chat --json` replies concurrently (greedy chain, seeded chain, greedy tree), stops the
hub, then decodes each reply's prompt with the target alone (transformers, float32, full
recomputation) and says whether each reply equals it token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASKED = [
    ("Write a Python function that reverses a string.", {"temperature": 0.0, "seed": 0, "tree": 0}),
    ("Explain what a hash map is in two sentences.", {"temperature": 0.8, "seed": 7, "tree": 0}),
    ("List three uses of a binary search.", {"temperature": 0.0, "seed": 0, "tree": 12}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from specedge_common.launcher import HubProcess

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    serve = ["--model", args.target, "--no-auth", "--device", "cpu", "--tensor-parallel", "2"]
    serve += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    started = time.monotonic()
    hub = HubProcess(serve, log_path=Path(tempfile.mkdtemp()) / "hub.log", env=env, cwd=REPO)
    try:
        hub.wait_ready(timeout_s=1200)
        print(f"hub ready in {time.monotonic() - started:.0f} s")
        replies = _ask_at_once(hub.url, args.draft, args.tokens, env)
    finally:
        hub.stop(timeout_s=60)
    _compare(args.target, args.cache_dir, replies)


def _ask_at_once(url: str, draft: str, tokens: int, env: dict) -> list[dict]:
    home = tempfile.mkdtemp()
    chats = []
    for prompt, how in ASKED:
        command = [sys.executable, "-m", "specedge_cli", "chat", "--hub", url, "-m", draft, "--json", "-t", "1"]
        command += ["-n", str(tokens), "--temperature", str(how["temperature"]), "--seed", str(how["seed"])]
        command += ["--tree-budget", str(how["tree"]), prompt]
        chats.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env={**env, "SPECEDGE_HOME": home},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    replies = []
    for chat in chats:
        out, err = chat.communicate(timeout=1800)
        if chat.returncode:
            raise SystemExit(f"specedge chat failed: {err}")
        replies.append(json.loads(out))
    return replies


def _compare(target: str, cache_dir: Path | None, replies: list[dict]) -> None:
    import torch

    from hub_server.config import default_cache_dir
    from hub_server.engine.loading import load_target
    from hub_server.engine.sampling import sample_row
    from hub_server.tree import position_uniform

    model = load_target(Path(target), "cpu", torch.float32, cache_dir or default_cache_dir())
    with torch.inference_mode():
        for (_, how), reply in zip(ASKED, replies):
            context, alone = list(reply["prompt_token_ids"]), []
            for _ in reply["token_ids"]:
                logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
                uniform = position_uniform(how["seed"], len(context))
                token = sample_row(logits, how["temperature"], uniform) if how["temperature"] else int(logits.argmax())
                context.append(token)
                alone.append(token)
            print(f"{how}: {len(alone)} tokens, equal to the target alone: {alone == reply['token_ids']}")


if __name__ == "__main__":
    main()
