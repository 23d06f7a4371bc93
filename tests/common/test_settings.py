import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cloudbot_common.settings import Settings

STRONG: dict[str, Any] = {
    "jwt_access_secret": "a" * 40 + "strong-access",
    "jwt_refresh_secret": "b" * 40 + "strong-refresh",
    "encryption_key": "q9Qf0aH3Pq8VfYcJ8b3CwK3Jj8m2x3X4nM5v7o1pZ0k=",
    "agent_token_secret": "c" * 40,
    "flower_password": "a real flower password",
    "local_dev_mode": False,
    "ec2_subnet_id": "subnet-0123456789abcdef0",
    "ec2_security_group_ids": "sg-0123456789abcdef0",
}


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


def test_development_defaults_are_fine_and_lists_parse():
    settings = Settings(
        _env_file=None,
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
