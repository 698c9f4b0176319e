"""How `hub_server serve` runs: one engine process, and one or more front ends serving HTTP in
front of it on one listening socket.

    --api-servers 1:  this process serves HTTP  ──▶ engine process
    --api-servers N:  this process supervises   ─┬▶ front end 1 ─┐
                      (binds the port once)      ├▶ front end 2 ─┼──▶ engine process
                                                 └▶ front end N ─┘

Every front end accepts on the same socket and serves any session (sessions are the engine's);
accounts are one SQLite file every front end reads at each request, so a revoked token is
refused by all of them from the next request on, and per-user budgets are counted once, in the
engine. A front end that dies costs its own connections only: the supervisor starts another.
SIGTERM or Ctrl+C: the front ends drain their requests, then the engine stops.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

from hub_server.config import HubSettings
from hub_server.connections import HubServer
from hub_server.engine_link import EngineLink, EngineProcess, end_with_parent, engine_address

log = logging.getLogger("hub_server")

RESTART_WAIT_S = 1.0  # between a front end's death and its replacement
EXIT_GRACE_S = 10.0  # past the shutdown timeout, for a front end to exit before it is killed
CUT_SHORT = 1  # a front end's exit status when its shutdown timeout cut replies in flight
PORT_TAKEN = 3


def run(settings: HubSettings) -> int:
    """Serve until SIGTERM or Ctrl+C; the exit status (0, CUT_SHORT, PORT_TAKEN)."""
    # uvicorn drains in-flight requests on SIGTERM or Ctrl+C, then re-raises the signal; a no-op
    # handler for that re-raise lets the hub exit 0 after a clean shutdown instead of dying by it.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    address = engine_address()
    if settings.front_ends == 1:
        link = EngineLink(address)
        engine = EngineProcess(settings, address, link.lost)
        engine.start()
        try:
            return serve_http(settings, link)
        finally:
            engine.stop()
    engine = EngineProcess(settings, address, lambda reason: None)  # each front end's link sees it go
    try:
        listening = _bind(settings)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return PORT_TAKEN
    engine.start()
    try:
        return FrontEnds(settings, address, listening).run()
    finally:
        engine.stop()


def serve_http(settings: HubSettings, link: EngineLink, sockets: list[socket.socket] | None = None) -> int:
    """Serve the hub's HTTP API in this process in front of the engine its `link` reaches."""
    import uvicorn

    from hub_server.app import create_app
    from hub_server.connections import guarded_protocol
    from hub_server.stream import MAX_FRAME_BYTES

    max_connections = max(1, settings.max_connections // settings.front_ends)  # the hub's cap, shared
    config = uvicorn.Config(
        create_app(settings, link=link),
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.request_timeout_s, max_connections, link.record_refusal),
        # Sessions' verify streams (stream.py): websockets is a client dependency, so always here;
        # a frame past twice a body's limit closes its stream (1009) before it is buffered whole.
        ws="websockets-sansio",
        ws_max_size=2 * MAX_FRAME_BYTES,
        log_config=None,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]  # a float works
        ssl_keyfile=settings.ssl_keyfile and str(settings.ssl_keyfile),
        ssl_certfile=settings.ssl_certfile and str(settings.ssl_certfile),
    )
    server = HubServer(config)
    server.run(sockets=sockets)
    if not server.started:  # the port is taken, say: uvicorn has logged why
        return PORT_TAKEN
    if server.cut_short:
        log.error(
            "hub stopped: the shutdown timeout (%g s) cut replies still in flight; give --shutdown-timeout more time",
            settings.shutdown_timeout_s,
        )
        return CUT_SHORT
    return 0


def _bind(settings: HubSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((settings.host, settings.port))
    listening.listen(2048)
    listening.set_inheritable(True)
    return listening


class FrontEnds:
    """N front-end processes accepting on one socket, each replaced when it dies."""

    def __init__(self, settings: HubSettings, address: str, listening: socket.socket):
        self.settings = settings
        self.address = address
        self.listening = listening
        self._stop = threading.Event()
        self._processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        host, port = self.listening.getsockname()[:2]
        log.info("serving on http://%s:%d with %d front ends", host, port, self.settings.front_ends)
        for index in range(self.settings.front_ends):
            threading.Thread(target=self._keep, args=(index,), name=f"front-end-{index}", daemon=True).start()
        self._stop.wait()
        return self._stop_all()

    def _keep(self, index: int) -> None:
        """Run front end `index`, again each time it dies, until the hub stops."""
        while not self._stop.is_set():
            process = self._launch()
            code = process.wait()
            if self._stop.is_set():
                return
            log.error("front end %d (pid %d) ended with code %s; starting another", index, process.pid, code)
            time.sleep(RESTART_WAIT_S)

    def _launch(self) -> subprocess.Popen:
        fd = self.listening.fileno()
        process = subprocess.Popen(
            [sys.executable, "-m", "hub_server.front_ends"], stdin=subprocess.PIPE, pass_fds=[fd]
        )
        assert process.stdin is not None
        with process.stdin:
            pickle.dump((self.settings, self.address, fd), process.stdin)
        with self._lock:
            self._processes = [p for p in self._processes if p.poll() is None] + [process]
        return process

    def _stop_all(self) -> int:
        """SIGTERM to every front end (they drain), their worst exit status once all are gone."""
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + EXIT_GRACE_S
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(CUT_SHORT)
        return CUT_SHORT if CUT_SHORT in codes else 0


def main() -> None:
    """A front end started by `FrontEnds`: its settings, the engine's address and the listening
    socket's descriptor come pickled on stdin."""
    from hub_server.logging_setup import configure_logging

    settings, address, fd = pickle.load(sys.stdin.buffer)
    configure_logging(settings.log_format)
    end_with_parent(os.getppid())
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    listening = socket.socket(fileno=fd)
    log.info("front end %d serving", os.getpid())
    sys.exit(serve_http(settings, EngineLink(address), sockets=[listening]))


if __name__ == "__main__":
    main()
