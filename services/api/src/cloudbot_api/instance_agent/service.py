"""What a CloudBot machine asks of the control plane: its configuration, once, in exchange
for its bootstrap token; then heartbeats with its instance credential."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from cloudbot_api.errors import ProblemError
from cloudbot_api.instance_agent.config import render_config
from cloudbot_api.instance_agent.repository import InstanceAgentRepository
from cloudbot_api.instance_agent.schemas import BootstrapIn, BootstrapOut, HeartbeatIn
from cloudbot_api.unit_of_work import UnitOfWork
from cloudbot_common.events import publish_health_changed
from cloudbot_common.instance_contract import CREDENTIAL_PREFIX, HEARTBEAT_PATH
from cloudbot_common.logging import get_logger
from cloudbot_common.models import Instance, InstanceState
from cloudbot_common.providers import Provider
from cloudbot_common.security.instance_identity import (
    IdentityError,
    verify_aws_identity,
    verify_local_identity,
)
from cloudbot_common.security.opaque import agent_credential, new_token, token_digest
from cloudbot_common.security.vault import Vault, VaultError
from cloudbot_common.settings import Settings

log = get_logger(__name__)

_GONE = (InstanceState.TERMINATING, InstanceState.TERMINATED, InstanceState.FAILED)


def refuse(code: str) -> ProblemError:
    return ProblemError(
        401, code, "Not a valid credential.", headers={"WWW-Authenticate": "Bearer"}
    )


class InstanceAgentService:
    def __init__(self, uow: UnitOfWork, *, vault: Vault, redis: Redis, settings: Settings) -> None:
        self.uow = uow
        self.repo = InstanceAgentRepository(uow.session)
        self.redis = redis
        self.vault = vault
        self.settings = settings

    async def bootstrap(self, token: str | None, proof: BootstrapIn) -> BootstrapOut:
        """Trade a bootstrap token, which works once and until it expires, for the
        machine's configuration (its owner's provider keys included) and a credential,
        provided the machine also proves it is the one launched for that instance."""
        if token is None:
            raise refuse("invalid_bootstrap_token")
        instance = await self.repo.by_bootstrap_digest_for_update(token_digest(token))
        now = datetime.now(UTC)
        if (
            instance is None
            or instance.bootstrap_expires_at is None
            or instance.bootstrap_expires_at <= now
            or instance.state in _GONE
        ):
            raise refuse("invalid_bootstrap_token")
        named = self._machine_named(instance, proof)
        recorded = instance.backend_instance_id
        if named is None or (recorded is not None and named != recorded):
            # The same answer as a bad token (no oracle), and the token is left unspent.
            log.warning("bootstrap refused: no proof of the machine", instance_id=str(instance.id))
            raise refuse("invalid_bootstrap_token")
        if recorded is None:
            # A machine that boots faster than its launch is recorded: it asks again.
            raise ProblemError(
                503,
                "machine_not_recorded",
                "The machine is not recorded yet; try again shortly.",
                headers={"Retry-After": "2"},
            )
        credential = new_token(CREDENTIAL_PREFIX)
        instance.bootstrap_token_hash = None  # single use
        instance.bootstrap_expires_at = None
        instance.credential_hash = token_digest(credential)

        keys: dict[Provider, str] = {}
        for row in await self.repo.owner_keys(instance.owner_id):
            try:
                keys[Provider(row.provider)] = self.vault.decrypt(
                    row.user_id, row.provider, row.ciphertext
                )
            except (VaultError, ValueError):
                log.warning("stored key unusable; left out", provider=row.provider)
        secret = self.settings.agent_token_secret.get_secret_value()
        agent_token = agent_credential(secret, instance.id)
        log.info("instance bootstrapped", instance_id=str(instance.id), providers=sorted(keys))
        return BootstrapOut(
            instance_id=instance.id,
            credential=credential,
            agent_token=agent_token,
            config=render_config(instance, keys, agent_token),
            heartbeat_url=self.settings.public_api_url.rstrip("/") + HEARTBEAT_PATH,
            heartbeat_interval_seconds=self.settings.heartbeat_interval_seconds,
        )

    def _machine_named(self, instance: Instance, proof: BootstrapIn) -> str | None:
        """The machine the proof names, once its signature holds: AWS's (for the configured
        region) or, for a local desktop, the local backend's. None: no such proof."""
        document, signature = proof.identity_document, proof.identity_signature
        if not document or not signature:
            return None
        try:
            if instance.backend == "local":
                secret = self.settings.agent_token_secret.get_secret_value()
                fields = verify_local_identity(document, signature, secret=secret)
                named, ours = (
                    fields.get("machine_id"),
                    fields.get("instance_id") == str(instance.id),
                )
            else:
                fields = verify_aws_identity(
                    document, signature, certs_dir=self.settings.instance_identity_certs_dir
                )
                named = fields.get("instanceId")
                ours = fields.get("region") == self.settings.aws_region
        except IdentityError:
            return None
        return named if ours and isinstance(named, str) and named else None

    async def heartbeat(self, credential: str | None, health: HeartbeatIn) -> None:
        """Record the machine's own report of its desktop and agent."""
        if credential is None:
            raise refuse("invalid_instance_credential")
        instance = await self.repo.by_credential_digest(token_digest(credential))
        if instance is None or instance.state in _GONE:
            raise refuse("invalid_instance_credential")
        now = datetime.now(UTC)
        beat = instance.last_heartbeat_at
        changed = (
            beat is None
            or now - beat > timedelta(seconds=self.settings.heartbeat_stale_seconds)
            or (instance.desktop_healthy, instance.agent_healthy) != (health.desktop, health.agent)
        )
        instance.desktop_healthy = health.desktop
        instance.agent_healthy = health.agent
        instance.last_heartbeat_at = now
        # For idle stop: the machine's own word on whether it is in use.
        instance.agent_busy = health.working
        if health.last_active_at is not None:
            reported = min(health.last_active_at, now)  # a machine's clock may run ahead
            if instance.last_activity_at is None or reported > instance.last_activity_at:
                instance.last_activity_at = reported
        if changed:  # shown as it was (or as unknown) until now: tell the owner's streams
            instance_id, owner_id, redis = instance.id, instance.owner_id, self.redis

            async def announce() -> None:
                await publish_health_changed(redis, instance_id, owner_id)

            self.uow.after_commit(announce)
