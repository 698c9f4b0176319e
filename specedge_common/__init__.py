"""What the client (`specedge_cli`) and the hub (`hub_server`) must agree on, written once.

Imports neither torch nor FastAPI (nor either side's package), so the light client and the
torch-free parts of the hub can both depend on it:

- `vocab`: the vocabulary fingerprint a session is opened with, and llama.cpp's vocabulary walks;
- `net`: the loopback check and free loopback ports;
- `launcher`: the one way to start `hub_server serve` as a child process (the embedded hub of
  `specedge chat`, `hub_server bench`, the tests), and the embedded hub's token variable;
- `extras`: the hub's own packages (the `hub` extra), so either side can say what to install;
- `metric_names`: the `/metrics` names that readers outside the hub look up.
"""
