import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cloudbot_common.settings import Settings

pytestmark = pytest.mark.fast

STRONG: dict[str, Any] = {
    "jwt_access_secret": "Jq3v_8ZkWm2Lr7Tn5Yc1Px9Hb4Gd6Fs0Ae-Ui",
    "jwt_refresh_secret": "R2d-7Nx4Kp9Vq1Lm6Wz3Ty8Hc5Bf0Gj_Se",
    "encryption_key": "q9Qf0aH3Pq8VfYcJ8b3CwK3Jj8m2x3X4nM5v7o1pZ0k=",
    "agent_token_secret": "A8s_D7f6G5h4J3k2L1z0X9c8V7b6N5m4Q3w2E1",
    "flower_password": "a real flower password",
    "local_dev_mode": False,
    "ec2_subnet_id": "subnet-0123456789abcdef0",
    "ec2_security_group_ids": "sg-0123456789abcdef0",
    "public_api_url": "https://api.cloudbot.example",
    "public_gateway_url": "wss://gateway.cloudbot.example",
}


@pytest.fixture(autouse=True)
def _no_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test run sets ENVIRONMENT=test for the services; these tests say what they mean.
    monkeypatch.delenv("ENVIRONMENT", raising=False)


def test_production_refuses_development_secrets_naming_them():
    with pytest.raises(ValidationError) as info:
        Settings(environment="production", _env_file=None)
    text = str(info.value)
    for name in (
        "JWT_ACCESS_SECRET",
        "JWT_REFRESH_SECRET",
        "ENCRYPTION_KEY",
        "AGENT_TOKEN_SECRET",
        "FLOWER_PASSWORD",
        "LOCAL_DEV_MODE",
    ):
        assert name in text


def test_production_refuses_one_missing_secret():
    with pytest.raises(ValidationError, match="JWT_REFRESH_SECRET"):
        Settings(environment="production", _env_file=None, **{**STRONG, "jwt_refresh_secret": ""})


def test_production_accepts_real_secrets():
    settings = Settings(environment="production", _env_file=None, **STRONG)
    assert settings.environment == "production"


@pytest.mark.parametrize("missing", ["ec2_subnet_id", "ec2_security_group_ids"])
def test_production_refuses_to_launch_without_a_private_subnet_and_security_group(missing):
    # Without them EC2 launches into the default VPC: a public subnet, a public address.
    with pytest.raises(ValidationError, match="EC2_SUBNET_ID and EC2_SECURITY_GROUP_IDS"):
        Settings(environment="production", _env_file=None, **{**STRONG, missing: ""})


def test_unset_environment_means_production_rules():
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    text = str(info.value)
    assert "ENVIRONMENT is not set" in text
    assert "JWT_ACCESS_SECRET" in text
    assert "LOCAL_DEV_MODE" in text
    # Real secrets and no local desktops: production without saying so is fine.
    assert Settings(_env_file=None, **STRONG).environment == "production"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jwt_access_secret", "short-but-not-dev"),
        ("jwt_refresh_secret", "ab" * 24),
        ("agent_token_secret", "x" * 64),
        ("agent_token_secret", "tooshort"),
        ("flower_password", "flower"),
        ("flower_password", "aaaaaaaaaaaaaaaaaaaaaaaa"),
        ("encryption_key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        ("encryption_key", "not-a-fernet-key"),
        ("encryption_key", STRONG["encryption_key"] + ",c2hvcnQ="),
    ],
)
def test_production_refuses_weak_secrets(name: str, value: str):
    with pytest.raises(ValidationError, match=name.upper()):
        Settings(environment="production", _env_file=None, **{**STRONG, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("public_api_url", "http://api.cloudbot.example"),
        ("public_gateway_url", "ws://gateway.cloudbot.example"),
        ("public_gateway_url", "https://gateway.cloudbot.example"),
    ],
)
def test_production_requires_tls_public_urls(name: str, value: str):
    with pytest.raises(ValidationError, match=name.upper()):
        Settings(environment="production", _env_file=None, **{**STRONG, name: value})


@pytest.mark.parametrize("seconds", [0, 86400])
def test_a_bootstrap_token_lives_as_long_as_a_boot_needs_and_no_longer(seconds):
    # It sits in the machine's user data until used: a day-long one is a standing key.
    assert Settings(_env_file=None, environment="test").bootstrap_token_ttl_seconds <= 600
    with pytest.raises(ValidationError, match="bootstrap_token_ttl_seconds"):
        Settings(_env_file=None, environment="test", bootstrap_token_ttl_seconds=seconds)


def test_development_defaults_are_fine_and_lists_parse():
    settings = Settings(
        _env_file=None,
        environment="development",
        cors_origins="http://a.test, http://b.test",
        instance_sizes="small=t3.small,big=m7i.xlarge",
    )
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert settings.instance_sizes == {"small": "t3.small", "big": "m7i.xlarge"}


def test_every_setting_is_in_the_env_example_and_the_readme():
    root = Path(__file__).resolve().parents[2]
    names = {name.upper() for name in Settings.model_fields}
    example_text = (root / ".env.example").read_text()
    example = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example_text, re.M))
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", (root / "README.md").read_text(), re.M))
    assert names - example == set(), ".env.example lacks these"
    assert names - documented == set(), "the README's settings table lacks these"
    assert example - names == set(), ".env.example names settings that do not exist"


def test_earlier_jwt_setting_names_are_accepted(monkeypatch):
    """An existing deployment's .env names JWT_SECRET_KEY and JWT_REFRESH_SECRET_KEY."""
    monkeypatch.setenv("JWT_SECRET_KEY", "an access secret of the earlier name " + "x" * 8)
    monkeypatch.setenv("JWT_REFRESH_SECRET_KEY", "a refresh secret of the earlier name " + "y" * 8)
    settings = Settings(_env_file=None, environment="development")
    assert settings.jwt_access_secret.get_secret_value().startswith("an access secret")
    assert settings.jwt_refresh_secret.get_secret_value().startswith("a refresh secret")
    # The current names win when both are set.
    monkeypatch.setenv("JWT_ACCESS_SECRET", "the current name " + "z" * 20)
    current = Settings(_env_file=None, environment="development")
    assert current.jwt_access_secret.get_secret_value().startswith("the current")


def test_sizes_must_be_known_and_the_default_offered():
    with pytest.raises(ValidationError, match=r"m9x\.huge"):
        Settings(_env_file=None, environment="development", instance_sizes="small=m9x.huge")
    with pytest.raises(ValidationError, match="DEFAULT_INSTANCE_SIZE"):
        Settings(_env_file=None, environment="development", default_instance_size="tiny")
