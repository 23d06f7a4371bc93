"""Proofs of which machine is asking, as bootstrap wants them: EC2 instance identity
documents signed by a certificate of the tests' own (AWS's key is AWS's), configured for
every API of the run through INSTANCE_IDENTITY_CERTS_DIR, and local machines' documents."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.x509.oid import NameOID

from cloudbot_common.security.instance_identity import sign_local_identity
from cloudbot_common.settings import Settings
from tests.support.processes import LOG_DIR

REGION = "us-east-1"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: rsa.RSAPrivateKey) -> bytes:
    """A PEM certificate for `key`, as AWS publishes one per region."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CloudBot tests")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@lru_cache(maxsize=1)
def _authority() -> tuple[rsa.RSAPrivateKey, str]:
    """The run's stand-in for AWS: a key, and a directory holding its certificate for
    REGION. One per test process (each xdist worker starts its own services)."""
    key = new_key()
    directory = LOG_DIR / f"identity-certs-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{REGION}.pem").write_bytes(self_signed(key))
    return key, str(directory)


def certs_dir() -> str:
    return _authority()[1]


def aws_document(machine_id: str, region: str = REGION) -> str:
    """An instance identity document as IMDS serves it (pretty-printed JSON)."""
    return json.dumps(
        {
            "accountId": "123456789012",
            "architecture": "x86_64",
            "availabilityZone": f"{region}a",
            "imageId": "ami-12c6146b",
            "instanceId": machine_id,
            "instanceType": "t3.small",
            "pendingTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "privateIp": "10.0.0.12",
            "region": region,
            "version": "2017-09-30",
        },
        indent=2,
    )


def sign(document: str, key: rsa.RSAPrivateKey | None = None) -> str:
    """IMDS's `signature`: base64 of RSA PKCS#1 v1.5 SHA-256 over the document's bytes."""
    signer = key or _authority()[0]
    return base64.b64encode(signer.sign(document.encode(), PKCS1v15(), SHA256())).decode()


def aws_proof(machine_id: str, region: str = REGION) -> dict[str, Any]:
    document = aws_document(machine_id, region)
    return {"identity_document": document, "identity_signature": sign(document)}


def local_proof(
    instance_id: str, machine_id: str, settings: Settings | None = None
) -> dict[str, Any]:
    secret = (settings or Settings()).agent_token_secret.get_secret_value()
    document, signature = sign_local_identity(secret, instance_id, machine_id)
    return {"identity_document": document, "identity_signature": signature}
