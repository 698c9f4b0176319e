"""TLS served by uvicorn's certificate flags: the client verifies the certificate by default."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO, free_port, run_specedge

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: a private CA of one."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(folder / "key.pem"),
            "-out",
            str(folder / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    return folder / "key.pem", folder / "cert.pem"


@pytest.fixture(scope="module")
def tls_hub(tiny, certificate, tmp_path_factory):
    key, cert = certificate
    port = free_port()
    log = tmp_path_factory.mktemp("tls-hub") / "hub.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hub_server",
            "serve",
            "--model",
            str(tiny.hf_dir),
            "--port",
            str(port),
            "--no-auth",
            "--ssl-keyfile",
            str(key),
            "--ssl-certfile",
            str(cert),
        ],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", verify=trust, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url, cert
    process.terminate()
    assert process.wait(timeout=30) == 0


def test_client_trusts_the_hub_certificate_only_when_told(tls_hub):
    url, cert = tls_hub
    refused = run_specedge("whoami", "--hub", url)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "could not be verified" in refused.stderr and "SSL_CERT_FILE" in refused.stderr
    trusted = run_specedge("whoami", "--hub", url, "--json", env_extra={"SSL_CERT_FILE": str(cert)})
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["user"] == "local"


def test_plain_http_is_not_served_on_the_tls_port(tls_hub):
    url, _ = tls_hub
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https", "http") + "/health", timeout=5)


def test_the_session_stream_trusts_the_hub_certificate_as_http_does(tls_hub, monkeypatch):
    from specedge_cli.remote import protocol as wire
    from specedge_cli.remote.client import HubClient
    from specedge_cli.remote.stream import open_stream

    url, cert = tls_hub
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with HubClient(url) as client:
        info = client.info()
        opened = client.open_session(wire.OpenSessionRequest(info.vocab_size, info.vocab_fingerprint))
        client.feed(opened.session_id, [1, 300])
        stream = open_stream(client, opened.session_id)  # wss://, checked against SSL_CERT_FILE
        try:
            assert stream.verify([], [5]).context_len >= 3
        finally:
            stream.close()
    monkeypatch.delenv("SSL_CERT_FILE")
    with HubClient(url) as client, pytest.raises(ssl.SSLCertVerificationError):
        open_stream(client, opened.session_id)
