"""Accounts through the API in this process, on real Postgres and Redis (fast tier)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from sqlalchemy import select, update

from cloudbot_common.models import User as UserRow
from cloudbot_common.security.jwt_tokens import TokenCodec, TokenError, TokenType
from cloudbot_common.security.passwords import Passwords
from tests.support.leaks import SECRETS
from tests.support.problems import assert_problem
from tests.support.users import make_user, whoami

pytestmark = pytest.mark.fast


def forge(claims: dict, secret: str, alg: str = "HS256", kid: str = "k1") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forged tokens may use short keys on purpose
        return jwt.encode(claims, secret, algorithm=alg, headers={"kid": kid})


def base_claims(user_id: str, session_id: str, **over) -> dict:
    now = int(time.time())
    claims = {
        "iss": "cloudbot-control-plane",
        "aud": "cloudbot",
        "sub": user_id,
        "sid": session_id,
        "jti": str(uuid.uuid4()),
        "typ": "access",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(over)
    return claims


async def test_signup_login_me(http, user):
    r = await whoami(http, user.access_token)
    assert r.status_code == 200
    assert r.json()["email"] == user.email
    assert "password" not in r.text
    assert "hash" not in r.text


async def test_email_is_normalised_and_duplicates_conflict(http):
    email = f"Mixed-{uuid.uuid4().hex[:8]}@Example.com"
    password = "a perfectly fine passphrase"
    r = await http.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201
    assert r.json()["email"] == email.lower()
    r = await http.post("/api/auth/signup", json={"email": email.lower(), "password": password})
    assert_problem(r, 409, "email_taken")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"email": "not-an-email", "password": "long enough password"}, "email"),
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "a@example.com"}, "password"),
        ({"email": "a@example.com", "password": "long enough password", "admin": True}, "admin"),
    ],
)
async def test_signup_validation_errors_share_the_problem_shape(http, payload, field):
    body = assert_problem(
        await http.post("/api/auth/signup", json=payload), 422, "validation_failed"
    )
    assert any(field in err["loc"] for err in body["errors"])
    # The submitted values are never echoed back.
    assert "long enough password" not in json.dumps(body)


async def test_long_passwords_are_accepted_whole(http):
    email = f"long-{uuid.uuid4().hex[:8]}@example.com"
    password = "x" * 200 + "tail-that-matters"
    SECRETS.add(password)
    r = await http.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201
    r = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200
    SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])
    # A truncating hash would accept the prefix.
    r = await http.post("/api/auth/login", json={"email": email, "password": "x" * 200})
    assert_problem(r, 401, "invalid_credentials")


async def test_oversized_body_is_refused_before_reading(http):
    r = await http.post(
        "/api/auth/signup",
        content=b'{"email": "a@example.com", "password": "' + b"p" * 200_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_problem(r, 413, "payload_too_large")


async def test_unknown_email_and_wrong_password_answer_alike(http, user):
    wrong = await http.post("/api/auth/login", json={"email": user.email, "password": "nope" * 4})
    unknown = await http.post(
        "/api/auth/login",
        json={"email": f"nobody-{uuid.uuid4().hex}@example.com", "password": "nope" * 4},
    )
    assert_problem(wrong, 401, "invalid_credentials")
    assert_problem(unknown, 401, "invalid_credentials")
    assert wrong.json() == unknown.json()


async def test_refresh_rotates_and_reuse_revokes_the_session(http, user):
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert r.status_code == 200, r.text
    second = r.json()
    SECRETS.add(second["access_token"], second["refresh_token"])
    assert second["refresh_token"] != user.refresh_token
    assert (await whoami(http, second["access_token"])).status_code == 200

    # The first refresh token again: reuse. The whole session ends, newest tokens included.
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert_problem(r, 401, "refresh_token_reused")
    r = await http.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert_problem(r, 401, "invalid_refresh_token")
    assert_problem(await whoami(http, second["access_token"]), 401, "unauthorized")
    assert_problem(await whoami(http, user.access_token), 401, "unauthorized")


async def test_logout_ends_the_session(http, user):
    other = await make_user(http)
    r = await http.post("/api/auth/logout", headers=user.headers)
    assert r.status_code == 204
    assert_problem(await whoami(http, user.access_token), 401, "unauthorized")
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.refresh_token})
    assert_problem(r, 401, "invalid_refresh_token")
    # Other sessions are untouched.
    assert (await whoami(http, other.access_token)).status_code == 200


async def test_refresh_token_is_not_an_access_token(http, user):
    assert_problem(await whoami(http, user.refresh_token), 401, "unauthorized")
    r = await http.post("/api/auth/refresh", json={"refresh_token": user.access_token})
    assert_problem(r, 401, "invalid_refresh_token")


async def test_forged_tokens_are_refused(http, user, settings):
    claims = jwt.decode(user.access_token, options={"verify_signature": False})
    uid, sid = claims["sub"], claims["sid"]
    secret = settings.jwt_access_secret.get_secret_value()
    refresh_secret = settings.jwt_refresh_secret.get_secret_value()

    # Control: a token we forge with the right secret and claims works, so the refusals
    # below are about the one thing each changes.
    assert (await whoami(http, forge(base_claims(uid, sid), secret))).status_code == 200

    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = base64.urlsafe_b64encode(json.dumps(base_claims(uid, sid)).encode())
    alg_none = header.rstrip(b"=").decode() + "." + payload.rstrip(b"=").decode() + "."
    past = int(time.time()) - 3600
    bad = {
        "alg none": alg_none,
        "HS512 with the right secret": forge(base_claims(uid, sid), secret, alg="HS512"),
        "signed with the refresh secret": forge(base_claims(uid, sid), refresh_secret),
        "expired": forge(base_claims(uid, sid, iat=past - 600, exp=past), secret),
        "wrong audience": forge(base_claims(uid, sid, aud="someone-else"), secret),
        "wrong issuer": forge(base_claims(uid, sid, iss="evil"), secret),
        "refresh typ": forge(base_claims(uid, sid, typ="refresh"), secret),
        "unknown kid": forge(base_claims(uid, sid), secret, kid="k9"),
        "missing jti": forge(
            {k: v for k, v in base_claims(uid, sid).items() if k != "jti"}, secret
        ),
        "wrong secret": forge(base_claims(uid, sid), "x" * 48),
        "garbage": "not.a.token",
    }
    for name, token in bad.items():
        r = await whoami(http, token)
        assert r.status_code == 401, name
        assert r.headers["www-authenticate"] == "Bearer", name


async def test_algorithm_confusion_with_a_public_key_is_refused(http, user, settings):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = jwt.decode(user.access_token, options={"verify_signature": False})
    token = jwt.encode(
        base_claims(claims["sub"], claims["sid"]), key, algorithm="RS256", headers={"kid": "k1"}
    )
    assert (await whoami(http, token)).status_code == 401
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The classic confusion: HS256 keyed with public material the attacker knows, signed
    # by hand because PyJWT itself refuses to use a PEM key as an HMAC secret.
    token = hs256_by_hand(base_claims(claims["sub"], claims["sid"]), pem)
    assert (await whoami(http, token)).status_code == 401


def hs256_by_hand(claims: dict, key: bytes) -> str:
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


async def test_signup_rate_limit_per_address(http):
    statuses = []
    for _ in range(6):
        r = await http.post(
            "/api/auth/signup",
            json={
                "email": f"rl-{uuid.uuid4().hex[:8]}@example.com",
                "password": "long enough pass",
            },
        )
        statuses.append(r.status_code)
    assert statuses == [201] * 5 + [429]


async def test_refresh_rate_limit_per_address(http, user):
    token = user.refresh_token
    statuses = []
    for _ in range(31):
        r = await http.post("/api/auth/refresh", json={"refresh_token": token})
        statuses.append(r.status_code)
        if r.status_code == 200:
            token = r.json()["refresh_token"]
            SECRETS.add(token, r.json()["access_token"])
    assert statuses == [200] * 30 + [429]


async def test_password_rehashed_on_login_when_parameters_change(http, db):
    from argon2 import PasswordHasher

    email = f"rehash-{uuid.uuid4().hex[:8]}@example.com"
    password = "an old but valid passphrase"
    r = await http.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 201
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(password)
    await db.execute(update(UserRow).where(UserRow.email == email).values(password_hash=weak))
    await db.flush()
    r = await http.post("/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200
    SECRETS.add(r.json()["access_token"], r.json()["refresh_token"])
    stored = await db.scalar(select(UserRow.password_hash).where(UserRow.email == email))
    assert stored is not None
    assert stored != weak
    assert stored.startswith("$argon2id$v=19$m=12288,t=3,p=1$")


async def test_token_codec_rejects_its_own_refresh_tokens_as_access(settings):
    codec = TokenCodec(settings)
    issued = codec.issue(TokenType.REFRESH, uuid.uuid4(), uuid.uuid4())
    with pytest.raises(TokenError, match="invalid token"):
        codec.decode(issued.token, TokenType.ACCESS)
    expired = codec.issue(
        TokenType.ACCESS, uuid.uuid4(), uuid.uuid4(), now=datetime.now(UTC) - timedelta(hours=2)
    )
    with pytest.raises(TokenError, match="expired"):
        codec.decode(expired.token, TokenType.ACCESS)


async def test_password_hashing_runs_off_the_event_loop(settings):
    """While a hash is computed the loop keeps turning: a ticker yielding to the loop
    advances many times during one verification (it could not if argon2 ran on the loop)."""
    passwords = Passwords(settings)
    stored = await passwords.hash("a passphrase to check")
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks = 0
    assert await passwords.verify(stored, "a passphrase to check")
    assert not await passwords.verify(None, "a passphrase to check")  # the dummy path
    done = True
    await task
    passwords.close()
    assert ticks > 20
