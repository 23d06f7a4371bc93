"""Proof of which machine is asking, presented with the bootstrap token.

A stolen bootstrap token alone does not yield a machine's configuration: the exchange also
needs a document naming the machine, signed by someone the machine cannot impersonate.

- On EC2, the instance identity document and its `signature` as IMDS gives them: base64
  of an RSA PKCS#1 v1.5 SHA-256 signature over the document's bytes, made by AWS with the
  key whose certificate AWS publishes for each region (kept here, in `aws_identity/`).
- For a local desktop, a document {instance_id, machine_id, issued_at} that the local
  backend writes into the sandbox from the host, signed with an HMAC key derived from
  AGENT_TOKEN_SECRET, which the sandbox can neither read nor derive.

Each verifier returns the document's fields once its signature holds, else raises
IdentityError; which machine it must name is the caller's check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.hashes import SHA256

# A region name, so that it can name a file safely.
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_MAX_DOCUMENT = 16 * 1024


class IdentityError(Exception):
    """The proof is missing, malformed, or not signed by whom it must be."""


def _bytes(document: str) -> bytes:
    try:
        return document.encode()
    except UnicodeEncodeError as e:  # a lone surrogate: no machine sent that
        raise IdentityError("document is not UTF-8") from e


def _parse(document: str) -> dict[str, Any]:
    if len(document) > _MAX_DOCUMENT:
        raise IdentityError("document too large")
    try:
        fields = json.loads(document)
    except ValueError as e:
        raise IdentityError("document is not JSON") from e
    if not isinstance(fields, dict):
        raise IdentityError("document is not an object")
    return fields


def _b64(signature: str) -> bytes:
    try:
        return base64.b64decode("".join(signature.split()), validate=True)
    except (binascii.Error, ValueError) as e:  # non-ASCII included
        raise IdentityError("signature is not base64") from e


@lru_cache(maxsize=64)
def _aws_key(certs_dir: str, region: str) -> RSAPublicKey:
    if not _REGION.match(region):
        raise IdentityError("not a region")
    if certs_dir:
        path = Path(certs_dir) / f"{region}.pem"
        pem = path.read_bytes() if path.is_file() else None
    else:
        bundled = resources.files("cloudbot_common.security") / "aws_identity" / f"{region}.pem"
        pem = bundled.read_bytes() if bundled.is_file() else None
    if pem is None:
        raise IdentityError("no certificate for the region")
    key = x509.load_pem_x509_certificate(pem).public_key()
    if not isinstance(key, RSAPublicKey):
        raise IdentityError("the region's certificate is not RSA")
    return key


def verify_aws_identity(document: str, signature: str, *, certs_dir: str = "") -> dict[str, Any]:
    """The fields of an EC2 instance identity document whose signature verifies against
    the RSA certificate of the document's own region (from `certs_dir`, or the bundled
    ones when empty)."""
    data = _bytes(document)
    fields = _parse(document)
    region = fields.get("region")
    if not isinstance(region, str):
        raise IdentityError("document names no region")
    key = _aws_key(certs_dir, region)
    try:
        key.verify(_b64(signature), data, PKCS1v15(), SHA256())
    except InvalidSignature as e:
        raise IdentityError("signature does not verify") from e
    return fields


def _local_key(secret: str) -> bytes:
    # Its own derivation: neither an agent credential nor a bootstrap token leads to it.
    return hmac.new(secret.encode(), b"local-identity:", hashlib.sha256).digest()


def _local_mac(secret: str, document: str) -> bytes:
    return hmac.new(_local_key(secret), _bytes(document), hashlib.sha256).digest()


def sign_local_identity(secret: str, instance_id: str, machine_id: str) -> tuple[str, str]:
    """(document, base64 signature) naming a local machine, for its sandbox."""
    document = json.dumps(
        {
            "instance_id": instance_id,
            "machine_id": machine_id,
            "issued_at": datetime.now(UTC).isoformat(),
        }
    )
    return document, base64.b64encode(_local_mac(secret, document)).decode()


def verify_local_identity(document: str, signature: str, *, secret: str) -> dict[str, Any]:
    """The fields of a local machine's document whose HMAC verifies."""
    if not hmac.compare_digest(_b64(signature), _local_mac(secret, document)):
        raise IdentityError("signature does not verify")
    return _parse(document)
