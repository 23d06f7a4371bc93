"""The CloudBot configuration handed to an instance at bootstrap."""

from __future__ import annotations

from typing import Any

from cloudbot_common.instance_contract import AGENT_PORT, AGENT_WS_PATH, VNC_PORT
from cloudbot_common.models import Instance
from cloudbot_common.providers import ENV_VAR, Provider

CONFIG_VERSION = 1


def render_config(
    instance: Instance, provider_keys: dict[Provider, str], agent_token: str
) -> dict[str, Any]:
    return {
        "version": CONFIG_VERSION,
        "instance": {"id": str(instance.id), "name": instance.name, "size": instance.size},
        "desktop": {"vnc_port": VNC_PORT, "geometry": "1280x800", "depth": 24},
        "agent": {"port": AGENT_PORT, "ws_path": AGENT_WS_PATH, "auth_token": agent_token},
        "providers": {
            provider.value: {"api_key": key, "env": ENV_VAR[provider]}
            for provider, key in sorted(provider_keys.items())
        },
    }
