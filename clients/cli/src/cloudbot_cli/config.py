"""Where the CLI finds the API and its token: flags, then the environment, then the file
`cloudbot login` wrote ($XDG_CONFIG_HOME/cloudbot/credentials.json, mode 0600)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_API_URL = "http://127.0.0.1:8000"


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cloudbot" / "credentials.json"


@dataclass(frozen=True, slots=True)
class Credentials:
    api_url: str
    token: str | None


def load(api_url: str | None = None) -> Credentials:
    stored: dict[str, str] = {}
    path = credentials_path()
    if path.exists():
        stored = json.loads(path.read_text())
    url = api_url or os.environ.get("CLOUDBOT_API_URL") or stored.get("api_url") or DEFAULT_API_URL
    token = os.environ.get("CLOUDBOT_TOKEN") or stored.get("token")
    return Credentials(api_url=url.rstrip("/"), token=token)


def save(credentials: Credentials) -> Path:
    """Write the credentials readable by their owner only (created so, never widened)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_url": credentials.api_url, "token": credentials.token}, f)
    os.chmod(path, 0o600)
    return path


def forget() -> bool:
    path = credentials_path()
    if path.exists():
        path.unlink()
        return True
    return False
