"""How the agent gets its proof of identity for bootstrap: from the file its host wrote
(local desktops), or from the EC2 metadata service with IMDSv2's session token, the
document's bytes untouched (the signature is over them)."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cloudbot_provisioner.machine.agent import identity_proof
from tests.support.identity import aws_document, sign
from tests.support.processes import free_port

pytestmark = pytest.mark.fast

DOCUMENT = aws_document("i-0123456789abcdef0")
SIGNATURE = sign(DOCUMENT)


class _Imds(BaseHTTPRequestHandler):
    """IMDSv2 as EC2 serves it: a PUT for a session token, then GETs that carry it."""

    token = secrets.token_urlsafe(16)

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token" or not self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self._answer(400, b"")
            return
        self._answer(200, self.token.encode())

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            self._answer(401, b"")  # IMDSv1 is off
            return
        leaves = {
            "/latest/dynamic/instance-identity/document": DOCUMENT,
            "/latest/dynamic/instance-identity/signature": SIGNATURE,
        }
        body = leaves.get(self.path)
        self._answer(200 if body else 404, (body or "").encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_proof_from_imdsv2_keeps_the_document_bytes(imds, monkeypatch):
    monkeypatch.delenv("CLOUDBOT_IDENTITY_FILE", raising=False)
    monkeypatch.setenv("CLOUDBOT_IMDS_URL", imds)
    assert identity_proof() == {"identity_document": DOCUMENT, "identity_signature": SIGNATURE}


def test_no_metadata_service_means_no_proof_yet(monkeypatch):
    """Nothing is sent (so no refusal is spent) until the proof can be had."""
    monkeypatch.delenv("CLOUDBOT_IDENTITY_FILE", raising=False)
    monkeypatch.setenv("CLOUDBOT_IMDS_URL", f"http://127.0.0.1:{free_port()}")
    assert identity_proof() is None


def test_proof_from_the_file_the_host_wrote(tmp_path: Path, monkeypatch):
    path = tmp_path / "identity"
    path.write_text(json.dumps({"document": "{}", "signature": "c2ln"}))
    monkeypatch.setenv("CLOUDBOT_IDENTITY_FILE", str(path))
    assert identity_proof() == {"identity_document": "{}", "identity_signature": "c2ln"}
    path.unlink()
    assert identity_proof() is None
