"""EC2 user data: the boot script `machine/user_data.sh` with this machine's values."""

from __future__ import annotations

import base64
import gzip
import re
import shlex
import uuid
from functools import cache
from importlib import resources

from cloudbot_common import instance_contract as contract

_PLACEHOLDER = re.compile(r"__[A-Z_]+__")
# EC2 refuses user data above 16 KiB (before base64).
MAX_USER_DATA_BYTES = 16 * 1024


@cache
def _template() -> str:
    return resources.files("cloudbot_provisioner.machine").joinpath("user_data.sh").read_text()


@cache
def _agent_source() -> str:
    """The agent file, gzipped and base64-encoded in 76-column lines for a heredoc."""
    source = resources.files("cloudbot_provisioner.machine").joinpath("agent.py").read_bytes()
    packed = base64.b64encode(gzip.compress(source, mtime=0)).decode()
    return "\n".join(packed[i : i + 76] for i in range(0, len(packed), 76))


def render_user_data(instance_id: uuid.UUID, api_url: str, bootstrap_token: str) -> str:
    """The boot script of one machine. Its only secret is the single-use bootstrap token."""
    values = {
        "__INSTANCE_ID__": shlex.quote(str(instance_id)),
        "__API_URL__": shlex.quote(api_url.rstrip("/")),
        "__VNC_PORT__": str(contract.VNC_PORT),
        "__AGENT_PORT__": str(contract.AGENT_PORT),
        "__GATE_VNC_PORT__": str(contract.GATE_VNC_PORT),
        "__GATE_AGENT_PORT__": str(contract.GATE_AGENT_PORT),
        "__AGENT_WS_PATH__": shlex.quote(contract.AGENT_WS_PATH),
        "__BOOTSTRAP_PATH__": shlex.quote(contract.BOOTSTRAP_PATH),
        "__HEARTBEAT_PATH__": shlex.quote(contract.HEARTBEAT_PATH),
        "__BOOTSTRAP_TOKEN__": shlex.quote(bootstrap_token),
        "__AGENT_SOURCE__": _agent_source(),
    }
    script = _PLACEHOLDER.sub(lambda m: values[m.group(0)], _template())
    if len(script.encode()) > MAX_USER_DATA_BYTES:
        raise ValueError(f"user data is {len(script.encode())} bytes; EC2 allows 16 KiB")
    return script
