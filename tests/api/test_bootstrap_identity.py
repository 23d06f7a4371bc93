"""Bootstrap is bound to the machine: a stolen bootstrap token alone, or with a proof of
another machine, a tampered one or one not signed by AWS (or by the local backend), gets
nothing, and is answered exactly as a bad token is. A refused proof leaves the token
unspent for the real machine."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from cloudbot_common.models import Instance, InstanceState
from cloudbot_common.security.instance_identity import (
    IdentityError,
    verify_aws_identity,
    verify_local_identity,
)
from cloudbot_common.security.opaque import agent_credential
from cloudbot_common.settings import Settings
from tests.support.identity import aws_document, aws_proof, local_proof, new_key, sign
from tests.support.instances import create, give_bootstrap_token, move
from tests.support.leaks import SECRETS
from tests.support.problems import assert_problem
from tests.support.users import User

pytestmark = pytest.mark.fast


async def _machine(
    http: httpx.AsyncClient, user: User, db: AsyncSession, conn: AsyncConnection, backend: str
) -> tuple[str, str, str]:
    """(instance id, its machine's id, a bootstrap token) of an instance being provisioned."""
    iid = (await create(http, user)).json()["id"]
    await move(conn, None, iid, InstanceState.PROVISIONING)
    row = await db.get(Instance, uuid.UUID(iid))
    assert row is not None
    row.backend = backend
    row.backend_instance_id = f"local-{iid}" if backend == "local" else f"i-{uuid.uuid4().hex[:17]}"
    machine_id = row.backend_instance_id
    await db.flush()
    token = await give_bootstrap_token(conn, iid)
    return iid, machine_id, token


async def _bootstrap(
    http: httpx.AsyncClient, token: str, proof: dict[str, Any] | None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if proof is None:
        return await http.post("/api/agent/bootstrap", headers=headers)
    return await http.post("/api/agent/bootstrap", json=proof, headers=headers)


async def _refused_then_real_machine_boots(
    http: httpx.AsyncClient,
    db: AsyncSession,
    iid: str,
    token: str,
    refused: dict[str, Any] | None,
    right: dict[str, Any],
) -> None:
    r = await _bootstrap(http, token, refused)
    # The same problem as a bad token: nothing tells a token holder what was missing.
    assert_problem(r, 401, "invalid_bootstrap_token")
    row = await db.get(Instance, uuid.UUID(iid), populate_existing=True)
    assert row is not None
    assert row.bootstrap_token_hash is not None  # not spent by the refusal
    assert row.credential_hash is None
    # The machine the instance was launched on still bootstraps with it.
    r = await _bootstrap(http, token, right)
    assert r.status_code == 200, r.text
    SECRETS.add(r.json()["credential"], r.json()["agent_token"])
    assert r.json()["instance_id"] == iid


# --- EC2 -------------------------------------------------------------------------------


async def test_stolen_token_without_identity_document_gets_nothing(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    await _refused_then_real_machine_boots(http, db, iid, token, None, aws_proof(machine))


async def test_stolen_token_with_only_a_document_gets_nothing(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    unsigned = {"identity_document": aws_document(machine)}
    await _refused_then_real_machine_boots(http, db, iid, token, unsigned, aws_proof(machine))


async def test_document_of_another_machine_gets_nothing(http, user, db, db_connection):
    """An attacker's own EC2 machine has a genuine document: of the wrong instance."""
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    other = aws_proof("i-0123456789abcdef0")
    await _refused_then_real_machine_boots(http, db, iid, token, other, aws_proof(machine))


async def test_tampered_document_gets_nothing(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    genuine = aws_proof("i-0123456789abcdef0")
    tampered = {
        **genuine,
        "identity_document": genuine["identity_document"].replace("i-0123456789abcdef0", machine),
    }
    assert json.loads(tampered["identity_document"])["instanceId"] == machine
    await _refused_then_real_machine_boots(http, db, iid, token, tampered, aws_proof(machine))


async def test_document_signed_by_a_key_not_aws_gets_nothing(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    document = aws_document(machine)
    forged = {"identity_document": document, "identity_signature": sign(document, new_key())}
    await _refused_then_real_machine_boots(http, db, iid, token, forged, aws_proof(machine))


async def test_document_of_another_region_gets_nothing(http, user, db, db_connection):
    """Signed with the key AWS uses for us-east-1, but naming another region than the
    control plane's AWS_REGION."""
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    document = aws_document(machine).replace('"us-east-1', '"eu-west-1')
    elsewhere = {"identity_document": document, "identity_signature": sign(document)}
    await _refused_then_real_machine_boots(http, db, iid, token, elsewhere, aws_proof(machine))


async def test_garbage_signature_is_refused_like_a_bad_token(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    garbage = {"identity_document": aws_document(machine), "identity_signature": "not base64!"}
    await _refused_then_real_machine_boots(http, db, iid, token, garbage, aws_proof(machine))


async def test_a_machine_faster_than_its_record_is_asked_to_retry(http, user, db, db_connection):
    """A genuine proof that arrives before the launch recorded the machine is neither
    accepted nor spends the token: the agent asks again (503)."""
    iid, machine, token = await _machine(http, user, db, db_connection, "ec2")
    row = await db.get(Instance, uuid.UUID(iid))
    assert row is not None
    row.backend_instance_id = None
    await db.flush()
    r = await _bootstrap(http, token, aws_proof(machine))
    assert_problem(r, 503, "machine_not_recorded")
    row.backend_instance_id = machine
    await db.flush()
    r = await _bootstrap(http, token, aws_proof(machine))
    assert r.status_code == 200, r.text
    SECRETS.add(r.json()["credential"], r.json()["agent_token"])


def test_bundled_certificate_is_aws_and_refuses_other_signers():
    """With INSTANCE_IDENTITY_CERTS_DIR empty, AWS's published certificate decides: a
    document signed by any other key fails, as does a region with no certificate."""
    document = aws_document("i-0123456789abcdef0")
    with pytest.raises(IdentityError):
        verify_aws_identity(document, sign(document), certs_dir="")
    moon = aws_document("i-0123456789abcdef0", region="mo-moon-1")
    with pytest.raises(IdentityError):
        verify_aws_identity(moon, sign(moon), certs_dir="")


DATA = Path(__file__).parent / "data"
BUNDLED = resources.files("cloudbot_common.security") / "aws_identity"


def test_a_document_aws_signed_verifies_with_the_bundled_certificate():
    """A real instance identity document and its `signature`, as IMDS served them on an EC2
    machine, verify against the bundled certificate of their region; change one byte of
    the document, or of the signature, and they do not."""
    document = (DATA / "aws_identity_document.json").read_text()
    signature = (DATA / "aws_identity_document.sig").read_text()
    fields = verify_aws_identity(document, signature, certs_dir="")
    assert fields["instanceId"].startswith("i-")
    assert fields["region"] == "us-east-1"
    with pytest.raises(IdentityError):
        verify_aws_identity(document.replace("t2.micro", "t3.micro"), signature, certs_dir="")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(IdentityError):
        verify_aws_identity(document, flipped, certs_dir="")


def test_every_aws_region_has_its_certificate_bundled():
    """Every commercial, GovCloud and China region AWS publishes a certificate for is
    bundled, as an RSA certificate in force today, under the name the document's `region`
    gives."""
    regions = {p.name.removesuffix(".pem") for p in BUNDLED.iterdir() if p.name.endswith(".pem")}
    assert {"us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2",
            "sa-east-1", "ca-central-1", "me-south-1", "af-south-1", "il-central-1",
            "us-gov-west-1", "cn-north-1"} <= regions  # fmt: skip
    now = datetime.now(UTC)
    for region in regions:
        cert = x509.load_pem_x509_certificate((BUNDLED / f"{region}.pem").read_bytes())
        assert isinstance(cert.public_key(), RSAPublicKey), region
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc, region


# --- Local desktops -------------------------------------------------------------------


async def test_local_token_without_proof_gets_nothing(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "local")
    await _refused_then_real_machine_boots(http, db, iid, token, None, local_proof(iid, machine))


async def test_local_proof_of_another_machine_gets_nothing(http, user, db, db_connection):
    """Another sandbox's proof (its own instance and machine) does not open this one."""
    iid, machine, token = await _machine(http, user, db, db_connection, "local")
    other = str(uuid.uuid4())
    stolen = local_proof(other, f"local-{other}")
    await _refused_then_real_machine_boots(http, db, iid, token, stolen, local_proof(iid, machine))


async def test_local_proof_signed_with_what_a_sandbox_knows_gets_nothing(
    http, user, db, db_connection
):
    """A sandbox holds its agent credential, not AGENT_TOKEN_SECRET: a document it signs
    with what it has does not verify."""
    iid, machine, token = await _machine(http, user, db, db_connection, "local")
    secret = Settings().agent_token_secret.get_secret_value()
    known = agent_credential(secret, uuid.UUID(iid))
    forged = local_proof(iid, machine, Settings(agent_token_secret=known))
    await _refused_then_real_machine_boots(http, db, iid, token, forged, local_proof(iid, machine))


async def test_local_tampered_proof_gets_nothing(http, user, db, db_connection):
    iid, machine, token = await _machine(http, user, db, db_connection, "local")
    other = str(uuid.uuid4())
    genuine = local_proof(other, f"local-{other}")
    tampered = {
        **genuine,
        "identity_document": genuine["identity_document"].replace(other, iid),
    }
    await _refused_then_real_machine_boots(
        http, db, iid, token, tampered, local_proof(iid, machine)
    )


def test_undecodable_documents_are_refused_not_errors():
    """Text that is no UTF-8 (a lone surrogate) is refused, never a crash."""
    odd = '{"region": "us-east-1"}\udfa5'
    with pytest.raises(IdentityError):
        verify_aws_identity(odd, sign('{"region": "us-east-1"}'), certs_dir="")
    with pytest.raises(IdentityError):
        verify_local_identity(odd, "c2ln", secret="s" * 32)
    with pytest.raises(IdentityError):
        verify_local_identity("{}", "\udfa5", secret="s" * 32)
