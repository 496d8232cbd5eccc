"""Logging: JSON lines for machines, plain lines for people, and the one line per RPC.

`configure_logging` sets up the root logger on stderr: `json` writes one JSON object per line
(`time`, `level`, `logger`, `message`, plus the record's structured fields), `text` a
readable line, `auto` picks text when stderr is a terminal and JSON otherwise.

`RpcLog` writes the per-RPC line (logger `server.rpc`, level INFO) with the method, the
status code, the duration, the shard, the principal (`user:42`, `admin`, `admin+user:42`, or
`anonymous` when the call has no verified token), the caller's `x-request-id` and SendMessage's
`request_id` when given, and the peer. It never writes message text, tokens, page tokens or
any other request field: what it may write is listed here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from server.config import LogConfig

RPC_LOGGER = "server.rpc"
#: The principal of a call without a verified token (health, reflection, refused calls).
ANONYMOUS = "anonymous"
_RPC_MESSAGE = "%s/%s %s %.2f ms"

#: Longest caller-supplied id written to a log line; longer ones are cut.
MAX_ID_CHARS = 128

#: Attributes every LogRecord has; anything else on a record is a structured field.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields (`extra=`) become top-level keys."""

    #: One encoder for every line (`json.dumps` with options builds a new one per call).
    _encoder = json.JSONEncoder(default=str, ensure_ascii=False)

    def __init__(self) -> None:
        super().__init__()
        # The time up to the second, formatted once per second: a server writes a line per call.
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "time": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry)


#: Fields the per-RPC line's text already shows.
_SHOWN_IN_TEXT = frozenset({"grpc_service", "grpc_method", "grpc_code", "duration_ms"})


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = " ".join(
            f"{k}={v}" for k, v in _fields(record).items() if v is not None and k not in _SHOWN_IN_TEXT
        )
        return f"{line} {extra}" if extra else line


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one writing `config.format` to `stream` (stderr)."""
    stream = stream or sys.stderr
    json_lines = config.format == "json" or (config.format == "auto" and not _is_terminal(stream))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    logging.getLogger(RPC_LOGGER).disabled = not config.rpc


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def safe_id(value: str) -> str:
    """A caller-supplied id fit for a log line: printable ASCII only, at most MAX_ID_CHARS."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in value[:MAX_ID_CHARS])
    return cleaned + ("..." if len(value) > MAX_ID_CHARS else "")


class RpcLog:
    """Writes the per-RPC line; costs one level check when the logger is off."""

    def __init__(self) -> None:
        self._logger = logging.getLogger(RPC_LOGGER)

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def record(
        self,
        *,
        service: str,
        method: str,
        code: str,
        seconds: float,
        shard: int | None,
        principal: str,
        peer: str | None,
        x_request_id: str | None,
        request_id: str | None,
    ) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        duration_ms = round(seconds * 1000, 3)
        fields: dict[str, Any] = {
            "grpc_service": service,
            "grpc_method": method,
            "grpc_code": code,
            "duration_ms": duration_ms,
            "shard": shard,
            "principal": principal,
            "peer": peer,
        }
        if x_request_id:
            fields["x_request_id"] = safe_id(x_request_id)
        if request_id:
            fields["request_id"] = safe_id(request_id)
        # The record is made here rather than by `logger.info`, which would walk the stack to find
        # the caller's file and line on every call: this line never shows them.
        record = logger.makeRecord(
            RPC_LOGGER,
            logging.INFO,
            __file__,
            0,
            _RPC_MESSAGE,
            (service, method, code, duration_ms),
            None,
            None,
            fields,
        )
        logger.handle(record)
