"""Logging for operators: a JSON formatter and a filter that keeps secrets out of log lines.

```python
LOGGING = {
    "version": 1,
    "filters": {"redact": {"()": "realtime.logs.RedactSecrets"}},
    "formatters": {"json": {"()": "realtime.logs.JSONFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json",
                             "filters": ["redact"]}},
    "loggers": {"realtime": {"handlers": ["console"], "level": "INFO"}},
}
```

Each JSON line carries `time`, `level`, `logger`, `message` and, when known, `correlationId`
(a log call's `extra`, else the request's or `realtime.correlation()`'s), `stream`, `seq`,
`eventId`, `connection` and `user` (from a log call's `extra`), `exception` and `stack`.
Tickets, tokens, session and CSRF cookies and `Authorization` credentials (Bearer, Basic,
DRF's Token) are replaced by `[redacted]`; payload bodies are never logged by realtime.

`PlainFormatter` is a `logging.Formatter` that appends the same fields, where known, to the
message: `... subscribed correlationId=… stream=project:1 connection=…` (and `seq=`,
`eventId=` on lines about one event).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

from .context import get_correlation_id

_NAMES = (
    r"(ticket|token|access_token|sessionid|csrftoken|csrfmiddlewaretoken|api_key|password|passwd)"
)
_SCHEMES = r"(?:bearer|basic|token|digest|negotiate)"


def _redact_items(match: re.Match[str]) -> str:
    items = re.sub(r"([\"'])(?!\[redacted\]\1)(?:(?!\1).)*\1", r"\1[redacted]\1", match[3])
    return f"{match[1]}{match[2]}[{items}]"


_SECRETS: list[tuple[re.Pattern[str], Any]] = [
    # A list of such values, as in a QueryDict's repr: {'ticket': ['a', 'b']}, every item.
    (re.compile(rf"(?i)(?<![a-z0-9]){_NAMES}([\"']?\s*:\s*)\[([^\]]*)\]"), _redact_items),
    # ?ticket=…, &refresh_token=…, sessionid=…, csrftoken=… in URLs, cookies and query strings,
    # and "ticket": "…" or 'HTTP_X_CSRFTOKEN': '…' in JSON and in reprs of dicts (request.GET,
    # request.META). Only letters and digits may come before the name: "_" separates.
    # Also `ticket = …`, a bytes value (b'…'), and a pair in a tuple's repr, as in parse_qsl()
    # or ASGI headers: ('ticket', '…'), (b'x-csrftoken', b'…').
    (
        re.compile(
            rf"(?i)(?<![a-z0-9]){_NAMES}"
            # Possessive: a bytes prefix (a b before a quote) or a quote is the separator's,
            # never the value's start.
            r"((?:[\"']?\s*(?:=|%3D|:)\s*(?:b(?=[\"']))?+[\"'(]*+)|(?:[\"']\s*,\s*b?[\"']))"
            r"(?!\[)([^&\s;,\"'\[\]()]+)"
        ),
        r"\1\2[redacted]",
    ),
    # Authorization headers (DRF's "Token …" too), as a header or a META key: a known scheme
    # is kept, the credential after it (or a bare one, whatever follows it) is not.
    (
        re.compile(
            r"(?i)(?<![a-z0-9])(authorization(?:[\"']?\s*[:=]\s*[\"']?|[\"']\s*,\s*b?[\"']))"
            rf"((?:{_SCHEMES}\s+)?)(?!\[redacted\])(?!{_SCHEMES}\s)([^\s\"',;]+)"
        ),
        r"\1\2[redacted]",
    ),
    (re.compile(r"(?i)\b(bearer|basic)\s+(?!\[redacted\])[A-Za-z0-9._~+/=-]+"), r"\1 [redacted]"),
]
# `seq` and `eventId` name the event of a line about one (a publish or a delivery that failed):
# with `stream` and `correlationId`, what an operator searches by when an event seems lost.
_FIELDS = ("stream", "seq", "eventId", "connection", "user")
# A plain field's value is written bare unless it holds a space, a quote, an "=" or a line
# break (or is long): then as a JSON string, so a stream name a client sent forges neither
# a field nor a line.
_BARE = re.compile(r"[^\s\"=]{1,200}")


def redact(text: str) -> str:
    """The text with every credential-looking value replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites each record's message (and exception text) without secrets; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: keep what we can
            message = str(record.msg)
        record.msg = redact(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation = getattr(record, "correlationId", None) or get_correlation_id()
        if correlation:
            entry["correlationId"] = correlation
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:  # log(..., stack_info=True), as the plain formatter shows it
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """A plain line, with `correlationId=`, `stream=`, `seq=`, `eventId=`, `connection=` and
    `user=` where known."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = [("correlationId", getattr(record, "correlationId", None) or get_correlation_id())]
        fields += [(name, getattr(record, name, None)) for name in _FIELDS]
        for name, value in fields:
            if value is None or value == "":
                continue
            text = str(value)
            if not _BARE.fullmatch(text):
                text = json.dumps(text, ensure_ascii=False)
            line += f" {name}={text}"
        return line
