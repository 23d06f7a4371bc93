#!/bin/bash
# CloudBot machine set-up, run once by cloud-init at first boot (EC2 user data).
#
# Rendered by the provisioner. It carries no secret but a short-lived, single-use
# bootstrap token: the agent exchanges it at BOOTSTRAP_PATH for the machine's CloudBot
# configuration and its instance credential, after which the token is worthless (so it
# does not matter that the instance metadata service keeps serving this script).
set -euo pipefail
umask 077

INSTANCE_ID=__INSTANCE_ID__
API_URL=__API_URL__
VNC_PORT=__VNC_PORT__
AGENT_PORT=__AGENT_PORT__
GATE_VNC_PORT=__GATE_VNC_PORT__
GATE_AGENT_PORT=__GATE_AGENT_PORT__
AGENT_WS_PATH=__AGENT_WS_PATH__
BOOTSTRAP_PATH=__BOOTSTRAP_PATH__
HEARTBEAT_PATH=__HEARTBEAT_PATH__
DISPLAY_NUMBER=1

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  xvfb x11vnc xterm x11-xserver-utils python3 python3-venv ca-certificates

id cloudbot >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash cloudbot
install -d -m 0700 -o cloudbot -g cloudbot /var/lib/cloudbot
install -d -m 0755 /opt/cloudbot /etc/cloudbot

# The token goes to a file only the agent can read (printf is a builtin: never on a
# command line); the agent deletes it once used.
printf '%s' __BOOTSTRAP_TOKEN__ > /var/lib/cloudbot/bootstrap-token
chown cloudbot:cloudbot /var/lib/cloudbot/bootstrap-token
chmod 0600 /var/lib/cloudbot/bootstrap-token

# The CloudBot agent (the provisioner's cloudbot_provisioner/machine/agent.py, gzip + base64).
base64 -d <<'AGENT' | gunzip > /opt/cloudbot/agent.py
__AGENT_SOURCE__
AGENT
chmod 0644 /opt/cloudbot/agent.py
python3 -m venv /opt/cloudbot/venv
/opt/cloudbot/venv/bin/pip install --quiet 'websockets>=13,<18'

cat > /etc/cloudbot/agent.env <<ENV
CLOUDBOT_INSTANCE_ID=${INSTANCE_ID}
CLOUDBOT_API_URL=${API_URL}
CLOUDBOT_STATE_DIR=/var/lib/cloudbot
CLOUDBOT_AGENT_HOST=127.0.0.1
CLOUDBOT_AGENT_PORT=${AGENT_PORT}
CLOUDBOT_GATE_HOST=0.0.0.0
CLOUDBOT_GATE_VNC_PORT=${GATE_VNC_PORT}
CLOUDBOT_GATE_AGENT_PORT=${GATE_AGENT_PORT}
CLOUDBOT_AGENT_WS_PATH=${AGENT_WS_PATH}
CLOUDBOT_VNC_HOST=127.0.0.1
CLOUDBOT_VNC_PORT=${VNC_PORT}
CLOUDBOT_BOOTSTRAP_PATH=${BOOTSTRAP_PATH}
CLOUDBOT_HEARTBEAT_PATH=${HEARTBEAT_PATH}
CLOUDBOT_BOOTSTRAP_TOKEN_FILE=/var/lib/cloudbot/bootstrap-token
ENV
chmod 0644 /etc/cloudbot/agent.env

# The desktop: a virtual display, a screen that names the instance, and a VNC server.
# VNC and the agent's WebSocket listen on loopback only; the agent's gate, on
# GATE_VNC_PORT and GATE_AGENT_PORT, is the one way in, and admits only a peer that proves
# the instance's credential. The security group (the gateway only) is a second layer.
cat > /etc/systemd/system/cloudbot-xvfb.service <<UNIT
[Unit]
Description=CloudBot virtual display
[Service]
User=cloudbot
ExecStart=/usr/bin/Xvfb :${DISPLAY_NUMBER} -screen 0 1280x800x24 -nolisten tcp -noreset
Restart=always
[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/cloudbot-desktop.service <<UNIT
[Unit]
Description=CloudBot desktop session
After=cloudbot-xvfb.service
Requires=cloudbot-xvfb.service
[Service]
User=cloudbot
Environment=DISPLAY=:${DISPLAY_NUMBER}
WorkingDirectory=/home/cloudbot
ExecStartPre=/bin/sh -c 'for i in \$\$(seq 100); do xsetroot -solid "#1d3557" && exit 0; sleep 0.2; done; exit 1'
ExecStart=/usr/bin/xterm -T "CloudBot ${INSTANCE_ID}" -geometry 120x36+40+40 -e /bin/bash -l
Restart=always
[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/cloudbot-vnc.service <<UNIT
[Unit]
Description=CloudBot desktop VNC server
After=cloudbot-xvfb.service
Requires=cloudbot-xvfb.service
[Service]
User=cloudbot
ExecStart=/usr/bin/x11vnc -display :${DISPLAY_NUMBER} -rfbport ${VNC_PORT} -localhost -nopw -forever -shared -quiet
Restart=always
RestartSec=1
[Install]
WantedBy=multi-user.target
UNIT

cat > /etc/systemd/system/cloudbot-agent.service <<UNIT
[Unit]
Description=CloudBot agent
After=network-online.target
Wants=network-online.target
[Service]
User=cloudbot
EnvironmentFile=/etc/cloudbot/agent.env
ExecStart=/opt/cloudbot/venv/bin/python /opt/cloudbot/agent.py
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT

systemctl daemon-reload
systemctl enable --now cloudbot-xvfb cloudbot-desktop cloudbot-vnc cloudbot-agent
