"""What the control plane and a CloudBot machine agree on: ports, paths, token shapes.

Flow: the provisioner mints a single-use bootstrap token (BOOTSTRAP_PREFIX), stores its
digest on the instance row and puts the token, with the control plane URL, in the user
data. At boot the machine POSTs it to BOOTSTRAP_PATH (as `Authorization: Bearer`) and
receives its configuration and an instance credential (CREDENTIAL_PREFIX), which it then
presents on HEARTBEAT_PATH.

On the machine the VNC server (VNC_PORT) and the agent's WebSocket (AGENT_PORT) listen on
loopback only. The gateway reaches them through the agent's gate (GATE_VNC_PORT and
GATE_AGENT_PORT, the only ports open to it), proving the instance's agent credential
(`security.opaque.agent_credential`; the protocol is `security.gate`); the agent's
WebSocket checks the same credential again as a bearer token.
"""

from __future__ import annotations

VNC_PORT = 5900
AGENT_PORT = 7878
GATE_VNC_PORT = 7900
GATE_AGENT_PORT = 7901
AGENT_WS_PATH = "/ws"
# How the gateway presents the agent credential upstream.
AGENT_AUTH_HEADER = "Authorization"

BOOTSTRAP_PATH = "/api/agent/bootstrap"
HEARTBEAT_PATH = "/api/agent/heartbeat"

BOOTSTRAP_PREFIX = "cbb_"
CREDENTIAL_PREFIX = "cbc_"
AGENT_PREFIX = "cba_"
