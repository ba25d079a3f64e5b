"""Structured logs: JSON lines with the correlation id and connection fields, never secrets."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

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


def plain_line(record_extra: dict[str, object], message: str = "subscribed") -> str:
    """One line as the demo's plain handler (config/settings.py) writes it."""
    from logging.config import DictConfigurator

    from django.conf import settings

    logging_config: dict[str, Any] = settings.LOGGING
    config = logging_config["formatters"]["plain"]
    formatter = DictConfigurator(logging_config).configure_formatter(dict(config))
    record = logging.getLogger("realtime.test").makeRecord(
        "realtime.test", logging.INFO, __file__, 1, message, (), None, extra=record_extra
    )
    return formatter.format(record)


def test_plain_lines_carry_the_correlation_id_and_the_extra_fields():
    line = plain_line({"correlationId": "corr-1", "stream": "project:1", "connection": "c9"})
    assert line.endswith(" subscribed correlationId=corr-1 stream=project:1 connection=c9")
    with realtime.correlation("from-context"):
        assert plain_line({"user": 7}).endswith(" subscribed correlationId=from-context user=7")
    assert plain_line({}).endswith(" INFO realtime.test subscribed")  # nothing to add


def test_plain_fields_cannot_forge_a_line_or_a_field():
    line = plain_line({"stream": "bad stream\n2026-01-01 ERROR forged x=1"})
    assert "\n" not in line
    assert line.endswith(' stream="bad stream\\n2026-01-01 ERROR forged x=1"')


def test_plain_fields_stay_on_the_first_line_of_a_traceback():
    from logging.config import DictConfigurator

    from django.conf import settings

    logging_config: dict[str, Any] = settings.LOGGING
    config = logging_config["formatters"]["plain"]
    formatter = DictConfigurator(logging_config).configure_formatter(dict(config))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.getLogger("realtime.test").makeRecord(
            "realtime.test",
            logging.ERROR,
            __file__,
            1,
            "failed",
            (),
            sys.exc_info(),
            extra={"connection": "c9"},
        )
    first, *rest = formatter.format(record).splitlines()
    assert first.endswith(" failed connection=c9")
    assert rest[-1] == "RuntimeError: boom"


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
        ("Authorization: sEcReTkEy from 10.0.0.1", "sEcReTkEy"),  # no scheme: all of it
        ("<QueryDict: {'ticket': ['first1', 'second2']}>", "second2"),  # every item
        ("[('ticket', 'abc.DEF-123:xyz')]", "abc.DEF-123:xyz"),  # parse_qsl(), QueryDict.items()
        ("{'ticket': b'abc.DEF-123:xyz'}", "abc.DEF-123:xyz"),  # a bytes value
        ("[(b'authorization', b'Token 9944b09199c62bcf')]", "9944b09199c62bcf"),  # ASGI headers
        ("[(b'x-csrftoken', b'tok123')]", "tok123"),
        ("ticket = abc.DEF-123:xyz", "abc.DEF-123:xyz"),
        ("{'password': 'hunter2hunter2'}", "hunter2hunter2"),
        ("password=hunter2hunter2", "hunter2hunter2"),
        ("{'ticket': ('abc.DEF-123:xyz',)}", "abc.DEF-123:xyz"),
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
    for text in ("bad ticket, origin='x'", "password changed for alice", "(4401 invalid ticket)"):
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


@pytest.fixture
def layer_down(monkeypatch):
    """The channel layer's group_send fails, as a Redis that is down; the backoff it starts
    is ended afterwards."""
    from channels.layers import get_channel_layer

    from realtime.publisher import publisher

    async def down(group: str, message: dict[str, Any]) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(get_channel_layer(), "group_send", down)
    yield
    monkeypatch.undo()
    publisher.resume()


@pytest.mark.django_db(transaction=True)
def test_a_failed_publish_names_the_event_its_stream_and_its_correlation_id(json_log, layer_down):
    from realtime.testing import flush

    with realtime.correlation("c-1"):
        envelope = realtime.emit("project:7", "v1:report.ready", {"rows": 3})
    flush()
    # The publisher's task runs in a context of its own: the id comes from the event itself.
    [line] = [line for line in json_log() if line["message"].startswith("publish of")]
    assert line["correlationId"] == "c-1"
    assert (line["stream"], line["seq"]) == ("project:7", envelope.seq)
    assert line["eventId"] == str(envelope.event_id)


@pytest.mark.django_db(transaction=True)
def test_a_failed_relay_publish_names_the_event_and_the_writers_correlation_id(
    json_log, layer_down
):
    from django.core.management import call_command

    from realtime.models import Event

    with realtime.correlation("c-2"):
        envelope = realtime.emit("project:8", "v1:report.ready", {"rows": 3})
    from realtime.testing import flush

    flush()
    Event.objects.filter(event_id=envelope.event_id).update(published_at=None)
    with pytest.raises(Exception, match="could not be published"):
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
    lines = [line for line in json_log() if line["message"].startswith("publish of")]
    assert lines[-1]["correlationId"] == "c-2"  # the writer's, not the relay pass's
    assert (lines[-1]["stream"], lines[-1]["seq"]) == ("project:8", envelope.seq)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_failed_delivery_names_the_event_and_the_connection(json_log):
    import asyncio

    from channels.layers import get_channel_layer

    from realtime.fanout import get_hub
    from realtime.publisher import LAYER_MESSAGE_TYPE

    class Socket:
        connection_id = "conn-9"

    class Broken:
        consumer = Socket()

        def deliver(self, message: dict[str, Any]) -> None:
            raise RuntimeError("boom")

        def resync(self) -> None:
            pass

    hub = get_hub()
    stream, subscriber = "project:9", Broken()
    await hub.join(stream, subscriber)
    frame = f'{{"op":"event","stream":"{stream}","seq":4,"eventId":"e-4","type":"v1:a.b",'
    frame += '"timestamp":"2026-12-07T12:00:00.000Z","correlationId":"c-3","data":{}}'
    message = {"type": LAYER_MESSAGE_TYPE, "stream": stream, "seq": 4, "eventId": "e-4"}
    try:
        await get_channel_layer().send(hub.channel, {**message, "frames": {"v1": frame}})
        for _ in range(250):
            lines = [line for line in json_log() if line["message"].startswith("delivery")]
            if lines:
                break
            await asyncio.sleep(0.02)
        [line] = lines
        assert (line["stream"], line["seq"], line["eventId"]) == (stream, 4, "e-4")
        assert (line["correlationId"], line["connection"]) == ("c-3", "conn-9")
    finally:
        await hub.leave(stream, subscriber)


def test_plain_lines_carry_the_event_fields():
    line = plain_line({"correlationId": "c-1", "stream": "project:1", "seq": 4, "eventId": "e"})
    assert line.endswith(" subscribed correlationId=c-1 stream=project:1 seq=4 eventId=e")
