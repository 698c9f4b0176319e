"""The round trip of one call to a Ray actor: a plain actor call against a compiled graph.

    .venv/bin/python benchmarks/ray_hop.py [--calls 300] [--sessions 64]

What the hop from the hub's front end to an engine worker costs, without the engine: the actor
echoes a batch of `--sessions` verify jobs in the shape `hub_server/workers.py` sends them (the
tuple `JobWire`), through `actor.method.remote` + `ray.get` and through `experimental_compile`.
Prints the p50 and p95 of each, side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=1, help="jobs in each call's batch")
    args = parser.parse_args()
    import ray
    from ray.dag import InputNode

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray.remote(num_cpus=1, concurrency_groups={"probe": 1})
    class Echo:
        def verify_batch(self, jobs):
            return [(job[4][:1], job[3][:2], 100) for job in jobs], 0.01, 0.002

    actor = Echo.remote()
    jobs = [("0" * 32, i, [5], list(range(8)), list(range(-1, 7)), 0.0, 0, (2,)) for i in range(args.sessions)]
    with InputNode() as batch:
        compiled = actor.verify_batch.bind(batch).experimental_compile()
    ways = {
        "plain actor call": lambda: ray.get(actor.verify_batch.remote(jobs)),
        "compiled graph": lambda: ray.get(compiled.execute(jobs)),
    }
    print(f"{args.sessions} job(s) a call, {args.calls} calls each, alternated in rounds of 50")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for call in ways.values():
        for _ in range(10):
            call()  # warm-up
    for _ in range(args.calls // 50):
        for name, call in ways.items():
            for _ in range(50):
                started = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - started) * 1000)
    for name, values in times.items():
        values.sort()
        print(f"{name:>18}: p50 {statistics.median(values):.3f} ms  p95 {values[int(0.95 * (len(values) - 1))]:.3f} ms")
    compiled.teardown()
    ray.shutdown()


if __name__ == "__main__":
    main()
