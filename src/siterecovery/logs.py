"""Logging of every service: text for people, or one JSON object per line for log collectors.

`configure_logging` installs one handler on the root logger, from the service's settings
(`--log-format text|json`, `--log-level`). A JSON line carries `time` (UTC, ISO 8601), `level`,
`logger`, `message`, the exception when there is one, and the ids of the work in hand: `item_id`,
`pair_id` and `job_id` come from context variables that the code working on an item, a pair or a
job sets with `log_context` (per thread and per asyncio task), or from `extra=` on the call.
The data plane's per-request paths do not log; they set no context either.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime

from siterecovery.config import LogFormat, LogLevel

TEXT_FORMAT = "%(asctime)s %(name)s %(message)s"

ITEM_ID: ContextVar[str | None] = ContextVar("item_id", default=None)
PAIR_ID: ContextVar[str | None] = ContextVar("pair_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)
_IDS = (("item_id", ITEM_ID), ("pair_id", PAIR_ID), ("job_id", JOB_ID))


@contextmanager
def log_context(
    *, item_id: str | None = None, pair_id: str | None = None, job_id: str | None = None
) -> Iterator[None]:
    """Within the block, every log line of this thread (or task) names these ids (None: unchanged)."""
    tokens: list[tuple[ContextVar[str | None], Token[str | None]]] = []
    for var, value in ((ITEM_ID, item_id), (PAIR_ID, pair_id), (JOB_ID, job_id)):
        if value is not None:
            tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in _IDS:
            value = getattr(record, name, None) or var.get()
            if value:
                line[name] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def announce(logger: str, fmt: LogFormat, message: str) -> None:
    """Tell the operator on stderr whatever the log level (e.g. the initial admin token), in the
    log's format, so a JSON log stays one JSON object per line."""
    if fmt is LogFormat.JSON:
        record = logging.makeLogRecord({"name": logger, "levelno": logging.WARNING, "levelname": "WARNING"})
        record.msg = message
        print(JsonFormatter().format(record), file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)


def route_to_root(*names: str) -> None:
    """Let these libraries' loggers (DBOS, uvicorn install their own text handlers) write through
    the root logger's handler, so a JSON log stays one JSON object per line."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def configure_logging(level: LogLevel, fmt: LogFormat) -> None:
    """Replace the root logger's handlers with one writing to stderr in `fmt`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.value, handlers=[handler], force=True)
