"""A soak: many sessions opening, verifying and closing on one hub for minutes; nothing may go
wrong, nothing may grow.

    .venv/bin/python benchmarks/soak.py [--sessions 64] [--minutes 10] [--target MODEL] [--json]

Starts a hub (`hub_server serve --no-auth`) on the tiny random target the tests build (or
`--target`), and N client threads. Each one, over and over: opens a session (greedy, or sampled
at temperature 0.8 with a seed of its own), sends a prompt, then verifies drafts until the reply
has `--max-tokens` tokens, and closes it; one session in eight is served by the hub alone
(`generate`, autoregressive) instead. Drafts are the right continuation with a token changed now
and then, so verifies accept some and reject the rest. Every token the hub emits is checked
against the target model decoding alone (full recomputation, no cache, same sampling rule),
computed here before the run. It reports errors (any answer but 200/204, any transport error),
wrong tokens, p50/p99 of each verify's round trip, and the hub's RSS after the first minute,
at the middle and at the end (growth is measured from the first minute on: what a process
allocates while it warms up is not a leak).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hub_server.engine.sampling import sample_row  # noqa: E402
from hub_server.tree import position_uniform  # noqa: E402
from specedge_common.launcher import HubProcess, HubStartError  # noqa: E402

PROMPTS = 16  # distinct prompts; each with greedy and sampled settings
TEMPERATURE = 0.8


@dataclass
class Tally:
    verifies: list[float] = field(default_factory=list)  # round trip of each verify, ms
    sessions: int = 0
    tokens: int = 0
    wrong_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def reference_replies(model_dir: Path, max_tokens: int, vocab: int) -> dict[tuple[int, int], tuple[list, list]]:
    """For each prompt and sampling setting (seed 0: greedy), the prompt and the target's reply alone."""
    from transformers import AutoModelForCausalLM

    # One thread: on a machine whose cores are busy (the hub, 64 clients) torch's threads spin
    # against each other (measured here: 440 ms a pass of the tiny model on 2 threads, 15 ms on 1).
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rng = random.Random(18)
    replies = {}
    for prompt_index in range(PROMPTS):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 40))]
        for seed in (0, 1000 + prompt_index):
            replies[(prompt_index, seed)] = (prompt, _decode_alone(model, prompt, max_tokens, seed))
    return replies


@torch.inference_mode()
def _decode_alone(model, prompt: list[int], max_tokens: int, seed: int) -> list[int]:
    context, reply = list(prompt), []
    while len(reply) < max_tokens:
        logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
        if seed == 0:
            token = int(logits.argmax())
        else:
            token = sample_row(logits, TEMPERATURE, position_uniform(seed, len(context)))
        context.append(token)
        reply.append(token)
    return reply


class SoakClient(threading.Thread):
    def __init__(self, index: int, url: str, info: dict, replies: dict, args, tally: Tally, deadline: float):
        super().__init__(name=f"soak-{index}", daemon=True)
        self.rng = random.Random(index)
        self.http = httpx.Client(base_url=url, timeout=120)
        self.info, self.replies, self.args, self.tally, self.deadline = info, replies, args, tally, deadline

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            try:
                self.one_session()
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                with self.tally.lock:
                    self.tally.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.5)
        self.http.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        answer = self.http.request(method, path, json=body)
        if answer.status_code not in (200, 204):
            raise ValueError(f"{method} {path.split('/')[-1]} answered {answer.status_code}: {answer.text[:200]}")
        return answer

    def one_session(self) -> None:
        key = self.rng.choice(list(self.replies))
        prompt, expected = self.replies[key]
        temperature = 0.0 if key[1] == 0 else TEMPERATURE
        opened = self._call(
            "POST",
            "/v1/sessions",
            {
                "protocol_version": self.info["protocol_version"],
                "vocab_size": self.info["vocab_size"],
                "vocab_fingerprint": self.info["vocab_fingerprint"],
                "sampling": {"temperature": temperature, "seed": key[1]},
            },
        )
        session = opened.json()["session_id"]
        try:
            if self.rng.random() < 1 / 8:
                got = self._generated(session, prompt)
            else:
                got = self._verified(session, prompt, expected)
        finally:
            self._call("DELETE", f"/v1/sessions/{session}")
        wrong = sum(1 for a, b in zip(got, expected) if a != b) + abs(len(got) - len(expected))
        with self.tally.lock:
            self.tally.sessions += 1
            self.tally.tokens += len(got)
            self.tally.wrong_tokens += wrong

    def _generated(self, session: str, prompt: list[int]) -> list[int]:
        body = {"tokens": prompt, "max_tokens": self.args.max_tokens}
        got = []
        with self.http.stream("POST", f"/v1/sessions/{session}/generate", json=body) as stream:
            if stream.status_code != 200:
                raise ValueError(f"generate answered {stream.status_code}")
            for line in stream.iter_lines():
                got += json.loads(line)["tokens"]
        return got

    def _verified(self, session: str, prompt: list[int], expected: list[int]) -> list[int]:
        got: list[int] = []
        pending = list(prompt)
        while len(got) < len(expected):
            room = len(expected) - len(got) - 1
            draft = [self._drafted(token) for token in expected[len(got) : len(got) + min(self.args.draft_len, room)]]
            started = time.perf_counter()
            reply = self._call("POST", f"/v1/sessions/{session}/verify", {"tokens": pending, "draft": draft}).json()
            with self.tally.lock:
                self.tally.verifies.append((time.perf_counter() - started) * 1000)
            got += reply["tokens"]
            pending = []
            time.sleep(self.rng.uniform(0, self.args.think_ms / 1000))  # the user's machine drafting
        return got

    def _drafted(self, token: int) -> int:
        """The right token most of the time: the target accepts some drafts and rejects the rest."""
        return token if self.rng.random() < 0.85 else self.rng.randrange(3, self.info["vocab_size"])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_hub(target: Path, sessions: int, workdir: Path, threads: int = 0) -> tuple[subprocess.Popen, str]:
    """The hub under soak, through the project's one launcher; its process and URL."""
    args = ["--model", str(target), "--no-auth", "--cache-dir", str(workdir / "cache")]
    args += ["--max-sessions", str(sessions + 8), "--max-draft-tokens", "16"]
    # torch reads OMP_NUM_THREADS at start: its intra-op threads for the hub's passes.
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    hub = HubProcess(args, log_path=workdir / "hub.log", env=env, cwd=REPO)
    try:
        hub.wait_ready(timeout_s=180)
    except HubStartError as exc:
        hub.stop()
        raise RuntimeError(f"{exc}\n{(workdir / 'hub.log').read_text()[-3000:]}") from exc
    return hub.process, hub.url


def tiny_target(workdir: Path) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model(workdir / "tiny", seed=0).hf_dir


def scrape(url: str, path: Path, until: float, every_s: float = 5.0) -> None:
    """Record the hub's /metrics page every few seconds (JSON lines: seconds since start, page), so
    that the Grafana dashboard's panels can be drawn from a real run (benchmarks/dashboard.py)."""
    started = time.monotonic()
    with path.open("w") as out, httpx.Client(base_url=url, timeout=30) as http:
        while time.monotonic() < until + every_s:
            page = http.get("/metrics").text
            out.write(json.dumps({"t": round(time.monotonic() - started, 2), "page": page}) + "\n")
            out.flush()
            time.sleep(every_s)


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[int(share * (len(values) - 1))] if values else float("nan")


def soak(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="specedge-soak-") as scratch:
        workdir = Path(scratch)
        target = Path(args.target) if args.target else tiny_target(workdir)
        process, url = start_hub(target, args.sessions, workdir, args.hub_threads)
        try:
            return _run(args, target, process, url)
        finally:
            process.terminate()
            process.wait(timeout=60)


def _run(args, target: Path, process, url: str) -> dict:
    info = httpx.get(f"{url}/v1/info").json()
    replies = reference_replies(target, args.max_tokens, info["vocab_size"])
    tally = Tally()
    seconds = args.minutes * 60
    started = time.monotonic()
    clients = [SoakClient(i, url, info, replies, args, tally, started + seconds) for i in range(args.sessions)]
    for client in clients:
        client.start()
    if args.scrape_to:
        threading.Thread(target=scrape, args=(url, Path(args.scrape_to), started + seconds), daemon=True).start()
    rss = {}
    for label, at in (("after_1_min", min(60, seconds / 4)), ("middle", seconds / 2), ("end", seconds)):
        time.sleep(max(0.0, started + at - time.monotonic()))
        rss[label] = rss_bytes(process.pid)
    for client in clients:
        client.join(timeout=300)
    metrics = httpx.get(f"{url}/metrics").text
    growth = rss["end"] / rss["after_1_min"] - 1
    return {
        "sessions": args.sessions,
        "minutes": args.minutes,
        "target": target.name,
        "hub_threads": args.hub_threads or "default",
        "sessions_served": tally.sessions,
        "verifies": len(tally.verifies),
        "tokens_checked": tally.tokens,
        "wrong_tokens": tally.wrong_tokens,
        "errors": len(tally.errors),
        "first_errors": tally.errors[:5],
        "verify_ms_p50": round(statistics.median(tally.verifies), 2) if tally.verifies else None,
        "verify_ms_p99": round(percentile(tally.verifies, 0.99), 2),
        "rss_mib": {label: round(value / 2**20, 1) for label, value in rss.items()},
        "rss_growth_after_first_minute": round(growth, 4),
        "evicted_sessions": _metric(metrics, "specedge_evicted_sessions_total"),
        "passed": not tally.errors and not tally.wrong_tokens and growth < 0.05 and tally.sessions > 0,
    }


def _metric(page: str, name: str) -> float | None:
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64, help="client sessions at once")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--target", help="target model (a Hugging Face folder or .gguf); default: the tiny test target")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    parser.add_argument("--draft-len", type=int, default=6)
    parser.add_argument(
        "--think-ms", type=float, default=20.0, help="longest pause between a reply and the next verify"
    )
    parser.add_argument("--hub-threads", type=int, default=0, help="torch threads of the hub; 0: torch's default")
    parser.add_argument("--scrape-to", help="record the hub's /metrics every 5 s into this JSON-lines file")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    report = soak(args)
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"soak: {report['sessions']} sessions x {report['minutes']:g} min on {report['target']}: "
        f"{report['sessions_served']} sessions served, {report['verifies']} verifies, "
        f"{report['tokens_checked']} tokens checked against the target alone\n"
        f"errors={report['errors']} wrong tokens={report['wrong_tokens']} "
        f"verify p50={report['verify_ms_p50']} ms p99={report['verify_ms_p99']} ms\n"
        f"hub RSS MiB {report['rss_mib']} growth after the first minute {report['rss_growth_after_first_minute']:.2%} "
        f"-> {'PASS' if report['passed'] else 'FAIL'}"
    )
    for error in report["first_errors"]:
        print("  ", error)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
