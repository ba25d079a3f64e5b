"""Structured logs: JSON lines with the correlation id and connection fields, never secrets."""

from __future__ import annotations

import io
import json
import logging

import pytest
from asgiref.sync import sync_to_async

import realtime
from realtime.logs import JSONFormatter, RedactSecrets, redact
from realtime.testing import RealtimeClient

from .factories import UserFactory

db = sync_to_async


@pytest.fixture
def json_log():
    """Every realtime/django log line as the production handler writes it (JSON, redacted)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(RedactSecrets())
    loggers = [logging.getLogger(name) for name in ("realtime", "django", "daphne")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)

    def lines():
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]

    yield lines
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_json_lines_carry_the_correlation_id_and_the_extra_fields(json_log):
    log = logging.getLogger("realtime.test")
    with realtime.correlation("corr-123"):
        log.warning("something about %s", "a stream", extra={"stream": "project:1", "user": 7})
    log.info("outside", extra={"connection": "abc"})
    first, second = json_log()
    assert first["correlationId"] == "corr-123"
    assert first["message"] == "something about a stream"
    assert (first["stream"], first["user"], first["level"]) == ("project:1", 7, "WARNING")
    assert "correlationId" not in second
    assert second["connection"] == "abc"


@pytest.mark.parametrize(
    "text",
    [
        "GET /ws/realtime/?ticket=abc.DEF-123:xyz&v=1",
        "Cookie: sessionid=s3cr3tsess; csrftoken=tok123",
        "Authorization: Bearer eyJhbGciOi.payload.sig",
        "redirect to /x?token=supersecret",
    ],
)
def test_secrets_are_redacted(text):
    cleaned = redact(text)
    for secret in ("abc.DEF-123:xyz", "s3cr3tsess", "tok123", "eyJhbGciOi", "supersecret"):
        assert secret not in cleaned
    assert "[redacted]" in cleaned


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('{"ticket": "abc.DEF-123:xyz"}', "abc.DEF-123:xyz"),  # a JSON body
        ("<QueryDict: {'ticket': ['abc.DEF-123:xyz']}>", "abc.DEF-123:xyz"),  # request.GET
        ("{'HTTP_X_CSRFTOKEN': 'tok123', 'PATH_INFO': '/'}", "tok123"),  # request.META
        ("/callback?refresh_token=supersecret&state=1", "supersecret"),
        ("Authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b", "9944b09199c62bcf"),
        ("'HTTP_AUTHORIZATION': 'Token 9944b09199c62bcf'", "9944b09199c62bcf"),
    ],
)
def test_secrets_are_redacted_in_quoted_and_prefixed_forms(text, secret):
    cleaned = redact(text)
    assert secret not in cleaned
    assert "[redacted]" in cleaned
    assert redact(cleaned) == cleaned  # a record that two handlers filter reads the same


def test_redaction_leaves_other_words_alone():
    text = "ticket refused for user 7 on project:1 (the token had expired)"
    assert redact(text) == text


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_ticket_never_reaches_a_log_line(json_log):
    from realtime.tickets import issue

    user = await db(UserFactory)()
    ticket = await db(issue)(user)
    good = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}&v=test")
    assert (await good.connect())["op"] == "welcome"
    await good.close()
    # The same ticket again (single use) and a forged one: refused and logged, without them.
    reused = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}")
    assert (await reused.connect())["code"] == 4401
    forged = RealtimeClient(path="/ws/realtime/?ticket=forged-ticket-value")
    assert (await forged.connect())["code"] == 4401
    # A log call that carelessly includes the query string is cleaned too.
    logging.getLogger("realtime.test").warning("query was ticket=%s", ticket)
    lines = json_log()
    assert any("refused" in line["message"] for line in lines)
    text = json.dumps(lines)
    assert ticket not in text
    assert ticket.split(":")[0] not in text
    assert "forged-ticket-value" not in text


def test_json_lines_keep_the_stack_a_log_call_asks_for(json_log):
    def where_it_happened():
        logging.getLogger("realtime.test").warning("look here", stack_info=True)

    where_it_happened()
    [line] = json_log()
    assert "where_it_happened" in line["stack"]
