"""Request ids and structured (JSON) logs of the retrieval service.

Every retrieval call gets a request id: the caller's `x-request-id` metadata when it sends a usable
one (so that one id follows a request through a fleet), a fresh one otherwise. The id goes back to
the caller in the trailing metadata — on errors too — and, with `serve.access_log`, into one log
record per call (method, status code, latency, peer). While the call runs, the id is in a context
variable, so that any log line the call writes (a failed search's traceback) carries it.
`serve.log_format=json` writes every record of the service as one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID_KEY = "x-request-id"
# Ids a caller may choose: short and printable, so that they are safe in logs and metadata.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:/=+-]{1,128}")
# Loggers of the packages a server runs; third-party loggers keep their own configuration.
SERVICE_LOGGERS = ("serving", "indexing", "towerline")
ACCESS_LOGGER = "serving.access"

current_request_id: ContextVar[str | None] = ContextVar("towerline_request_id", default=None)


def request_id_from(metadata: Any) -> str:
    """The caller's `x-request-id` if usable, else a new random id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the running call's request id on every record written while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


# Attributes every LogRecord has; anything else on a record came through `extra=` and is a field.
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the request id and
    every field passed with `extra=`; an exception's traceback as `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items()
                      if key not in _STANDARD_ATTRIBUTES and value is not None})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [request_id={request_id}]" if request_id else text


def configure_service_logging(log_format: str, access_log: bool, stream: Any = None) -> logging.Handler:
    """Route the service's own loggers to `stream` (stderr) in `log_format` ("text" or "json"), at
    INFO when access logging is on, else WARNING. Returns the handler (to remove it again)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    for name in SERVICE_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if access_log else logging.WARNING)
        # Records reach the stream once, through this handler, whatever the root logger does.
        logger.propagate = False
    return handler
