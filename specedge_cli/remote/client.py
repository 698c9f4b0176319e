"""HTTP client for a SpecEdge hub. httpx errors are translated into `specedge_cli.errors` here."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx

from specedge_cli.errors import HubBusy, HubRejected, HubUnreachable, InsecureHub, SessionLost, TokenRejected
from specedge_cli.remote import protocol as wire
from specedge_common.net import is_loopback

# A hub refuses connections until it has bound its port, after its imports (seconds): one refusing
# for this long after a command first knocked is taken to be down, not starting.
START_WINDOW_S = 30.0


def check_transport(url: str, insecure: bool = False) -> None:
    """Refuse plain http to another machine (tokens would cross the network in clear) unless told to."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InsecureHub(f"{url!r} is not a hub URL; give one like https://hub.example.com")
    if parsed.scheme == "http" and not insecure and not is_loopback(parsed.host):
        raise InsecureHub(
            f"refusing plain http to {parsed.host}: your token would cross the network unencrypted; "
            f"use https://, or pass --insecure (SPECEDGE_INSECURE=1) on a network you trust"
        )


class HubClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        insecure: bool = False,
    ):
        check_transport(base_url, insecure)
        self.base_url = base_url.rstrip("/")
        self.auth_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        # A transport of the caller's (an app in this process) carries HTTP only: no session stream.
        self.offers_streams = transport is None
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.auth_headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict:
        return self._request("GET", "/health", allow_unavailable=True)

    def health_once_up(self, on_starting: Callable[[], None], window_s: float = START_WINDOW_S) -> dict:
        """/health's answer, waiting out a hub that refuses connections for up to `window_s` (one
        still starting); `on_starting` is called once, when the first refusal comes."""
        deadline = time.monotonic() + window_s
        told = False
        while True:
            try:
                return self.health()
            except HubUnreachable as exc:
                if not _refused(exc) or time.monotonic() >= deadline:
                    raise
            if not told:
                on_starting()
                told = True
            time.sleep(0.25)

    def info(self) -> wire.HubInfo:
        return wire.HubInfo.from_json(self._request("GET", "/v1/info"))

    def whoami(self) -> wire.WhoAmIResponse:
        return wire.WhoAmIResponse.from_json(self._request("GET", "/v1/whoami"))

    def open_session(self, request: wire.OpenSessionRequest) -> wire.OpenSessionResponse:
        return wire.OpenSessionResponse.from_json(self._request("POST", "/v1/sessions", request.to_json()))

    def feed(self, session_id: str, tokens: list[int]) -> wire.FeedResponse:
        body = wire.FeedRequest(tokens=tokens).to_json()
        return wire.FeedResponse.from_json(self._request("POST", f"/v1/sessions/{session_id}/feed", body))

    def verify(
        self, session_id: str, tokens: list[int], draft: list[int], parents: list[int] | None = None
    ) -> wire.VerifyResponse:
        body = wire.VerifyRequest(tokens=tokens, draft=draft, parents=parents).to_json()
        return wire.VerifyResponse.from_json(self._request("POST", f"/v1/sessions/{session_id}/verify", body))

    def generate(self, session_id: str, request: wire.GenerateRequest) -> Iterator[wire.GenerateChunk]:
        """Server-only decoding: the hub's chunks as they stream in; the last has done = true."""
        try:
            with self._http.stream("POST", f"/v1/sessions/{session_id}/generate", json=request.to_json()) as response:
                if not response.is_success:
                    response.read()
                    raise _rejection(response)
                for line in response.iter_lines():
                    if line:
                        yield wire.GenerateChunk.from_json(json.loads(line))
        except httpx.TransportError as exc:
            raise HubUnreachable(
                f"the connection to the hub at {self.base_url} broke ({exc.__class__.__name__})"
            ) from exc

    def close_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    def metrics(self) -> str:
        """The hub's /metrics page, as text (Prometheus format; `specedge_bench.metrics` reads it)."""
        try:
            response = self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        if not response.is_success:
            raise _rejection(response)
        return response.text

    def _request(self, method: str, path: str, body: dict | None = None, allow_unavailable: bool = False) -> dict:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc
        if response.status_code == 204:
            return {}
        if response.is_success or (allow_unavailable and response.status_code == 503):
            return response.json()
        raise _rejection(response)


def _unreachable(base_url: str, exc: httpx.TransportError) -> HubUnreachable:
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return HubUnreachable(
            f"the TLS certificate of {base_url} could not be verified ({exc}); if the hub uses "
            f"a private CA, point SSL_CERT_FILE at its certificate"
        )
    return HubUnreachable(
        f"cannot reach the hub at {base_url} ({exc.__class__.__name__}); "
        f"check the URL and that `curl {base_url}/health` answers"
    )


def _refused(exc: BaseException) -> bool:
    """Whether the connection was refused (nothing listens on the port yet), not a name or TLS failure."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _rejection(response: httpx.Response) -> HubRejected:
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"the hub answered HTTP {response.status_code}: {response.text[:200]}"
    hub = str(response.request.url.copy_with(path="/", query=None)).rstrip("/")
    return hub_refusal(hub, response.status_code, code, message, response.headers.get("Retry-After"))


def hub_refusal(hub: str, status: int, code: str, message: str, retry_after: str | float | None) -> HubRejected:
    """The error a refusal of the hub at `hub` is, by its status and code (an HTTP answer or a stream's error frame)."""
    if status == 401:
        return TokenRejected(
            f"the hub at {hub} did not accept your token (missing, wrong or revoked); run `specedge login --hub {hub}`",
            status,
            code,
        )
    if status == 404 and code == "session_not_found":
        return SessionLost(message, status, code)
    if status in (429, 503):
        seconds = float(retry_after or 5)
        return HubBusy(f"{message} (retry in {seconds:g} s)", status, code, seconds)
    return HubRejected(f"the hub refused the request: {message}", status, code)
