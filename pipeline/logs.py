"""Logging: one config (JSON lines or readable text), applied only by the CLI, and contextvars that put
``job_id`` / ``batch_id`` / ``track_id`` on every line logged inside a task."""

from __future__ import annotations

import contextvars
import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
batch_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("batch_id", default=None)
track_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("track_id", default=None)

_CONTEXT = {"job_id": job_id_var, "batch_id": batch_id_var, "track_id": track_id_var}
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


@contextmanager
def bound(**values: str | None) -> Iterator[None]:
    """Bind context ids (job_id, batch_id, track_id) for the lines logged inside the block."""
    tokens = [(_CONTEXT[k], _CONTEXT[k].set(v)) for k, v in values.items()]
    try:
        yield
    finally:
        for var, tok in reversed(tokens):
            var.reset(tok)


class ContextFilter(logging.Filter):
    """Copies the bound context ids onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context ids and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and value is not None and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def logging_config(level: str = "INFO", fmt: str = "json") -> dict[str, Any]:
    """The dictConfig for the whole process."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)-7s %(name)s [%(job_id)s] %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["context"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            "aiobotocore": {"level": "WARNING"},
            "botocore": {"level": "WARNING"},
            # one line per request only at DEBUG: the callback route logs each callback it accepts or refuses
            # itself, and at thousands of callbacks a second an access line each would double the log
            "aiohttp.access": {"level": "INFO" if level == "DEBUG" else "WARNING"},
        },
    }


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Apply :func:`logging_config`. Only the CLI calls this.

    Also turns off what no line of ours shows: the caller's file, line and function (a stack walk per record),
    and the thread, process and task ids and names (the Logging HOWTO's "Optimization" knobs). That more than halves
    the cost of making a record (~6 -> ~2.5 us), which a callback pays for every line it logs."""
    logging._srcfile = None  # the HOWTO's documented switch for findCaller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # Python 3.12+: the task name
    logging.config.dictConfig(logging_config(level, fmt))
