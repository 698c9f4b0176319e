"""`hub_server bench`: what a hub sustains, SpecEdge against its server-only baselines, and what it costs.

N simulated users each draft with a real llama.cpp draft model (their "edge") and talk to a real
hub over HTTP, through the client's typed `HubClient`, with an emulated round-trip time. Three
modes run side by side: `specedge` (the users draft, the hub verifies, batched across users),
`server_only_spec` (the hub drafts with its own copy of the draft model and verifies) and
`autoregressive` (the hub decodes with the target alone).

The package by role:
- `config`: what a run is asked (`BenchConfig`), the modes, the shipped prompts, the prices;
- `edges`: each user's emulated edge device (`EmulatedEdges`: real drafts at a device's speed);
- `users`: the simulated users (`SimulatedUser`) and their connection to the hub;
- `workload`: what every run shares (prompts, the target's replies, the edges), checked against the hub;
- `metrics`: the one reader of a hub's `/metrics` (also used by `benchmarks/` and the tests);
- `runs`: one run of every mode, its figures and ratios; `cost`: tokens per dollar;
- `bound`: what the hardware allows at a run's load (the pass probe, or through the hub's API);
- `report`: the table and the plot; `command`: the `hub_server bench` command's body;
- `local_hub`: a hub started here, pinned away from the edges;
- `fleet`: many users over many workers, simulated in virtual time with the hub's real scheduler.

It is a client of the hub: it imports `hub_server` (the draft model, the pass probe, the
scheduler) and `specedge_cli` (the typed client); the hub imports it only inside the command.
"""
