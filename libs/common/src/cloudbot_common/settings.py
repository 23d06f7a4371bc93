"""Settings shared by every service, read from environment variables (see `.env.example`)."""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cloudbot_common.sizes import INSTANCE_TYPES

# Values that ship in `.env.example` and the defaults below. They are fine on a laptop
# and refused in production.
DEV_ACCESS_SECRET = "dev-access-secret-change-me-0123456789abcdef"
DEV_REFRESH_SECRET = "dev-refresh-secret-change-me-0123456789abcdef"
DEV_ENCRYPTION_KEY = "ZGV2LWVuY3J5cHRpb24ta2V5LWNoYW5nZS1tZS0wMDA="
DEV_AGENT_SECRET = "dev-agent-secret-change-me-0123456789abcdef"
DEV_FLOWER_PASSWORD = "dev-flower-password"
_DEV_VALUES = {
    DEV_ACCESS_SECRET,
    DEV_REFRESH_SECRET,
    DEV_ENCRYPTION_KEY,
    DEV_AGENT_SECRET,
    DEV_FLOWER_PASSWORD,
}


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


# Minimum strength of each secret in production: (characters, distinct characters). A
# secret made with `secrets.token_urlsafe(48)` has 64 characters and about 40 distinct.
_SECRET_STRENGTH = {
    "jwt_access_secret": (32, 16),
    "jwt_refresh_secret": (32, 16),
    "agent_token_secret": (32, 16),
    "flower_password": (16, 8),
}
# A Fernet key is 32 random bytes; a random one has about 30 distinct byte values.
_FERNET_KEY_MIN_DISTINCT_BYTES = 16


def _weak_fernet_keys(value: str) -> str | None:
    """Why the comma-separated Fernet keys in `value` are unfit, or None if they are fit."""
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        return "is missing"
    for key in keys:
        try:
            raw = base64.urlsafe_b64decode(key.encode())
        except (binascii.Error, ValueError):
            return "holds a key that is not url-safe base64"
        if len(raw) != 32:
            return "holds a key that is not 32 bytes (a Fernet key)"
        if len(set(raw)) < _FERNET_KEY_MIN_DISTINCT_BYTES:
            return "holds a key that is not random (generate it with Fernet.generate_key())"
    return None


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _split_pairs(value: object) -> object:
    """`small=t3.small,medium=t3.medium` -> {"small": "t3.small", "medium": "t3.medium"}."""
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        return {k.strip(): v.strip() for k, v in pairs}
    return value


CsvList = Annotated[list[str], NoDecode]
PairMap = Annotated[dict[str, str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # Unset means production: the development secrets and LOCAL_DEV_MODE are only accepted
    # when ENVIRONMENT says development or test in so many words.
    environment: Environment = Environment.PRODUCTION
    log_level: str = "INFO"
    log_json: bool = True
    control_plane_id: str = "cloudbot-local"

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/cloudbot"
    database_pool_size: int = 10
    # Bounds on every wait for Postgres, so a stalled or dead database turns requests into
    # a prompt 503 instead of a hang: opening a connection, one statement (enforced by the
    # client, which also catches a stalled network, and by the server as statement_timeout),
    # and waiting for a free connection of the pool.
    database_connect_timeout_seconds: float = Field(5, gt=0)
    database_command_timeout_seconds: float = Field(15, gt=0)
    database_pool_timeout_seconds: float = Field(10, gt=0)
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Connect and read timeout of every Redis client (the Celery broker's too).
    redis_socket_timeout_seconds: float = Field(5, gt=0)
    celery_broker_url: str | None = None

    # JWT_SECRET_KEY and JWT_REFRESH_SECRET_KEY are earlier names, still accepted so that an
    # existing deployment's environment keeps working.
    jwt_access_secret: SecretStr = Field(
        SecretStr(DEV_ACCESS_SECRET),
        validation_alias=AliasChoices("jwt_access_secret", "jwt_secret_key"),
    )
    jwt_refresh_secret: SecretStr = Field(
        SecretStr(DEV_REFRESH_SECRET),
        validation_alias=AliasChoices("jwt_refresh_secret", "jwt_refresh_secret_key"),
    )
    # Earlier secrets still accepted while tokens signed with them live: "kid=secret,..."
    jwt_previous_access_secrets: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict
    )
    jwt_key_id: str = "k1"
    jwt_issuer: str = "cloudbot-control-plane"
    jwt_audience: str = "cloudbot"
    access_token_ttl_seconds: int = 900
    refresh_token_ttl_seconds: int = 30 * 24 * 3600
    # A refresh token presented again by the same client this soon gets the same new pair
    # (its answer was lost); 0: every second presentation is a reuse.
    refresh_retry_seconds: int = Field(10, ge=0, le=60)

    # Comma-separated Fernet keys, newest first; older ones only decrypt.
    encryption_key: SecretStr = SecretStr(DEV_ENCRYPTION_KEY)
    agent_token_secret: SecretStr = SecretStr(DEV_AGENT_SECRET)

    argon2_time_cost: int = 3
    argon2_memory_cost_kib: int = 12288
    argon2_parallelism: int = 1

    cors_origins: CsvList = Field(
        default_factory=lambda: ["http://127.0.0.1:8000", "http://localhost:8000"]
    )
    allowed_ws_origins: CsvList = Field(
        default_factory=lambda: ["http://127.0.0.1:8000", "http://localhost:8000"]
    )
    trusted_proxies: CsvList = Field(default_factory=list)

    rate_limit_signup: str = "5/minute"
    # Login attempts per client address; wrong passwords per account from one address,
    # and per account from everywhere (the ceiling a distributed guesser meets).
    rate_limit_login: str = "10/minute"
    rate_limit_login_failures: str = "5/minute"
    rate_limit_login_account_failures: str = "100/hour"
    rate_limit_refresh: str = "30/minute"
    rate_limit_instance_create: str = "10/minute"
    rate_limit_instance_create_per_address: str = "120/minute"
    rate_limit_enabled: bool = True

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Prometheus /metrics on an internal listener of its own; port 0: no metrics listener.
    api_metrics_host: str = "127.0.0.1"
    api_metrics_port: int = Field(9100, ge=0, le=65535)
    # Share of successful, quick requests that get an access line (errors and slow requests
    # always do); below 1 where the log volume or its cost matters.
    api_access_log_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    # The desktop page's files (web/ of the repository, after `make install`); empty: the
    # checkout's own.
    web_dir: str = ""
    public_api_url: str = "http://127.0.0.1:8000"
    public_gateway_url: str = "ws://127.0.0.1:8001"
    max_live_instances_per_user: int = 3
    instance_sizes: PairMap = Field(
        default_factory=lambda: {"small": "t3.small", "medium": "t3.medium", "large": "t3.large"}
    )
    # The size an instance gets when the create request names none.
    default_instance_size: str = "small"
    # As long as a boot needs (launch, packages, the agent's first call), and never a
    # standing key: the token sits in the machine's user data until it is used.
    bootstrap_token_ttl_seconds: int = Field(600, ge=60, le=3600)
    ticket_ttl_seconds: int = 30
    # Server-Sent Events streams: open per user (all API replicas), and how long one lasts
    # before the client must reconnect (and authenticate again).
    sse_max_streams_per_user: int = Field(10, ge=1)
    sse_max_stream_seconds: int = Field(3600, ge=1)

    local_dev_mode: bool = True
    local_state_dir: str = ".local/instances"
    local_port_range_start: int = 47000

    aws_region: str = "us-east-1"
    # Where the RSA certificates that verify EC2 instance identity documents are kept, one
    # <region>.pem each; empty: AWS's, bundled with cloudbot_common.
    instance_identity_certs_dir: str = ""
    aws_endpoint_url: str | None = None
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    ec2_ami_id: str = "ami-12c6146b"
    ec2_subnet_id: str | None = None
    ec2_security_group_ids: CsvList = Field(default_factory=list)
    ec2_key_name: str | None = None
    # The image's root device, launched encrypted with this size.
    ec2_root_device_name: str = "/dev/xvda"
    ec2_root_volume_gib: int = Field(16, ge=1)

    task_max_retries: int = 5
    task_retry_backoff_max_seconds: int = 60
    outbox_relay_after_seconds: int = 30
    reconcile_interval_seconds: int = 60
    transition_timeout_seconds: int = 600
    # The beat that schedules holds a Redis lock this long, renewed a few times within it;
    # another beat stands by, and takes over once a dead holder's lock expires.
    beat_lock_ttl_seconds: int = Field(30, ge=3)
    heartbeat_stale_seconds: int = 120
    heartbeat_interval_seconds: int = Field(30, ge=1)

    # Webhooks: targets on private, loopback or link-local addresses are refused unless
    # listed here (CIDRs); plain http only to such listed networks.
    webhook_allowed_networks: CsvList = Field(default_factory=list)
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = Field(12, ge=1)
    webhook_retry_max_seconds: int = Field(3600, ge=1)
    webhook_relay_seconds: float = Field(2.0, gt=0)
    # Idle stop: the default for new machines (0: never), the warning's lead, the sweep's
    # period.
    idle_stop_minutes: int = Field(60, ge=0)
    idle_warning_minutes: int = Field(5, ge=0)
    idle_sweep_seconds: float = Field(30.0, gt=0)

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8001
    gateway_metrics_host: str = "127.0.0.1"
    gateway_metrics_port: int = Field(9101, ge=0, le=65535)
    gateway_max_message_bytes: int = 1 << 20
    gateway_max_sessions_per_user: int = 20
    gateway_idle_timeout_seconds: int = 300
    # Relay the desktop with splice(2) where the kernel allows it (checked at start).
    gateway_zero_copy: bool = True
    # On SIGTERM: stop accepting, let sessions run this long, then close them (1001).
    gateway_drain_timeout_seconds: int = 20
    # Gateway processes sharing the port (SO_REUSEPORT), each on its own core; 0: one per
    # CPU the container may use.
    gateway_workers: int = Field(1, ge=0)

    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr(DEV_FLOWER_PASSWORD)

    @model_validator(mode="before")
    @classmethod
    def _parse_lists(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in (
                "cors_origins",
                "allowed_ws_origins",
                "trusted_proxies",
                "ec2_security_group_ids",
                "webhook_allowed_networks",
            ):
                if key in data:
                    data[key] = _split_csv(data[key])
            for key in ("instance_sizes", "jwt_previous_access_secrets"):
                if key in data:
                    data[key] = _split_pairs(data[key])
        return data

    @model_validator(mode="after")
    def _metrics_ports_apart(self) -> Self:
        # Requests are told apart by the port they came in on (see cloudbot_api.main).
        if self.api_metrics_port == self.api_port:
            raise ValueError("API_METRICS_PORT must differ from API_PORT")
        if self.gateway_metrics_port == self.gateway_port:
            raise ValueError("GATEWAY_METRICS_PORT must differ from GATEWAY_PORT")
        return self

    @model_validator(mode="after")
    def _check_sizes(self) -> Self:
        unknown = sorted(set(self.instance_sizes.values()) - set(INSTANCE_TYPES))
        if unknown:
            raise ValueError(
                f"INSTANCE_SIZES names instance types not in cloudbot_common.sizes: {unknown}"
            )
        if self.default_instance_size not in self.instance_sizes:
            raise ValueError(
                f"DEFAULT_INSTANCE_SIZE {self.default_instance_size!r} is not one of "
                f"INSTANCE_SIZES ({', '.join(self.instance_sizes)})"
            )
        return self

    @model_validator(mode="after")
    def _refuse_weak_configuration_in_production(self) -> Self:
        if self.environment is not Environment.PRODUCTION:
            return self
        problems = []
        for name in (
            "jwt_access_secret",
            "jwt_refresh_secret",
            "encryption_key",
            "agent_token_secret",
            "flower_password",
        ):
            secret: SecretStr = getattr(self, name)
            value = secret.get_secret_value()
            if not value or value in _DEV_VALUES or any(v in value for v in _DEV_VALUES):
                problems.append(f"{name.upper()} is missing or left at its development default")
            elif name == "encryption_key":
                if why := _weak_fernet_keys(value):
                    problems.append(f"ENCRYPTION_KEY {why}")
            else:
                length, distinct = _SECRET_STRENGTH[name]
                if len(value) < length or len(set(value)) < distinct:
                    problems.append(
                        f"{name.upper()} is too weak: at least {length} characters, "
                        f"{distinct} of them different"
                    )
        for kid, previous in self.jwt_previous_access_secrets.items():
            if len(previous.get_secret_value()) < _SECRET_STRENGTH["jwt_access_secret"][0]:
                problems.append(f"JWT_PREVIOUS_ACCESS_SECRETS: the secret of {kid} is too short")
        if self.local_dev_mode:
            problems.append("LOCAL_DEV_MODE must be false in production")
        if not self.local_dev_mode and not (self.ec2_subnet_id and self.ec2_security_group_ids):
            problems.append(
                "EC2_SUBNET_ID and EC2_SECURITY_GROUP_IDS must be set in production "
                "(a private subnet, and a security group admitting the gateway only)"
            )
        if "*" in self.cors_origins:
            problems.append("CORS_ORIGINS must not contain '*' in production")
        if not self.public_api_url.startswith("https://"):
            problems.append("PUBLIC_API_URL must be an https:// URL in production")
        if not self.public_gateway_url.startswith("wss://"):
            problems.append("PUBLIC_GATEWAY_URL must be a wss:// URL in production")
        if problems:
            if "environment" not in self.model_fields_set:
                problems.insert(
                    0,
                    "ENVIRONMENT is not set, so production rules apply (set it to "
                    "development or test on a laptop)",
                )
            raise ValueError("; ".join(problems))
        return self

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
