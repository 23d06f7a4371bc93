"""Structured logging for every service: JSON in production, readable in a terminal.

A redaction step runs on every event, so a secret passed by mistake as a field never
reaches the output.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_FIELD = re.compile(
    r"pass(word)?|secret|token|authorization|api[_-]?key|credential|cookie|ticket|ciphertext",
    re.IGNORECASE,
)
# Bearer tokens, JWTs, our own opaque token prefixes and model providers' API keys
# (OpenAI's sk-... and sk-proj-..., Anthropic's sk-ant-...), wherever they appear in text.
# The named prefixes stay in front of the redaction mark; what follows them goes.
_SECRET_TEXT = re.compile(
    r"(?P<bearer>Bearer\s+)\S+"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|\b(?P<opaque>cb[a-z]_)[A-Za-z0-9_-]{16,}"
    r"|(?<![A-Za-z0-9_-])(?P<provider>sk-(?:ant-|proj-)?)[A-Za-z0-9_-]{12,}"
    r"|(?P<param>[?&](?:ticket|token|access_token)=)[^&\s\"']+",
    re.IGNORECASE,
)
REDACTED = "[redacted]"

# Libraries whose INFO lines are never wanted (we write our own access lines).
_QUIET_LIBRARIES = ("uvicorn.access", "botocore", "aiobotocore", "asyncio")
# Libraries whose INFO lines are routine: a line per Celery task received and succeeded
# (with the whole task dict), beat's every schedule tick, start-up chatter (alembic's
# plugins, Flower's task list, connection notices). Shown at LOG_LEVEL=DEBUG only; their
# warnings and errors always.
_ROUTINE_LIBRARIES = (
    "alembic",
    "celery.app.trace",
    "celery.worker.strategy",
    "celery.worker.request",
    "celery.worker.consumer",
    "celery.beat",
    "kombu",
    "flower.command",
)
# Fields that only repeat the message in another form (uvicorn's coloured copy, Celery's
# task dict): kept in JSON, left out of a terminal's line.
_CONSOLE_DROPPED = ("color_message", "data")


def redact_text(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        kept = m.group("bearer") or m.group("opaque") or m.group("provider") or m.group("param")
        return (kept or "") + REDACTED

    return _SECRET_TEXT.sub(repl, text)


def _redact(value: Any, key: str = "") -> Any:
    if key and _SECRET_FIELD.search(key) and value is not None:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact(value, "" if key == "event" else key)
    return event_dict


def _drop_console_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _CONSOLE_DROPPED:
        event_dict.pop(key, None)
    return event_dict


def configure_logging(
    service: str, *, level: str = "INFO", json_output: bool = True, stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library through one redacting pipeline."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    # A terminal shows the line a person reads; machines (JSON) get every field.
    terse: list[Any] = [] if json_output else [_drop_console_fields]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_processor,
            lambda _l, _m, ed: {**ed, "service": service},
            *terse,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in _QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for routine in _ROUTINE_LIBRARIES:
        logging.getLogger(routine).setLevel(
            logging.WARNING if root.level >= logging.INFO else root.level
        )
    # uvicorn installs its own handlers; send them through ours instead.
    for name in ("uvicorn", "uvicorn.error", "celery", "websockets"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
