"""JSON log lines: one object per record on stdout, URL passwords masked.

Only ``workers/`` and the CLI call ``configure_logging``; library modules just log under ``proxy``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from proxy.errors import ConfigError

LEVEL_ENV = "MESSAGE_PROXY_LOG_LEVEL"
LOGGERS = ("proxy", "workers")
# The client library logs connection trouble itself; its lines must be JSON too.
LIBRARY_LOGGERS = ("redis",)
_HANDLER_NAME = "message-proxy-json"

# scheme://user:password@ -- the password runs to the last "@" before a "/" or whitespace, so an
# unescaped "@" inside it is still masked (over-masking is the safe side).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^/\s]*@")

# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """Mask the password of every URL in ``text``: ``amqp://user:***@host``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def _fallback(value: object) -> str:
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = redact(value) if isinstance(value, str) else value
        try:
            return orjson.dumps(entry, default=_fallback, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # e.g. an int beyond 64 bits in an extra: keep the line, stringify
            safe = {key: _fallback(value) for key, value in entry.items()}
            return orjson.dumps(safe).decode()


def _parse_level(level: str | int, source: str) -> int:
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name.isdigit():
        return int(name)
    number = logging.getLevelNamesMapping().get(name)
    if number is None:
        raise ConfigError(source, f"unknown log level {level!r}")
    return number


def configure_logging(level: str | int = "INFO", *, stream: TextIO | None = None) -> None:
    """Send ``proxy.*`` and ``workers.*`` records as JSON lines to ``stream`` (default stdout).

    ``MESSAGE_PROXY_LOG_LEVEL`` overrides ``level`` when set. Calling again replaces the handler.
    """
    from_env = os.environ.get(LEVEL_ENV)
    resolved = _parse_level(from_env, LEVEL_ENV) if from_env else _parse_level(level, "level")
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter())
    for name in (*LOGGERS, *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.setLevel(resolved if name in LOGGERS else max(resolved, logging.WARNING))
        logger.propagate = False  # one line per record, even if something configured the root
    # Records of any other library (asyncio's "Task exception was never retrieved", ...) reach the
    # root at its own level, WARNING by default: without this, Python's last-resort handler prints
    # them to stderr as plain, unmasked text.
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Python warnings (e.g. "coroutine ... was never awaited" when a failed connect is
    # garbage-collected) too, instead of plain text on stderr.
    logging.captureWarnings(True)


def set_level(level: str | int) -> None:
    """A new ``log_level`` for a running worker (a reload); ``MESSAGE_PROXY_LOG_LEVEL`` still
    wins. Only where ``configure_logging`` installed the handler: an embedding program's own
    logging is left alone."""
    from_env = os.environ.get(LEVEL_ENV)
    resolved = _parse_level(from_env, LEVEL_ENV) if from_env else _parse_level(level, "log_level")
    for name in (*LOGGERS, *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        if any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
            logger.setLevel(resolved if name in LOGGERS else max(resolved, logging.WARNING))
