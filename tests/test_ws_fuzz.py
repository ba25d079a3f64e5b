"""Generated inbound frames: the consumer never crashes and answers only documented codes."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.protocol import Code
from realtime.testing import RealtimeClient, session_for

from .factories import UserFactory

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def documented_codes() -> set[str]:
    """The codes in the first column of the error-code table of docs/protocol.md (§9)."""
    text = PROTOCOL_DOC.read_text()
    section = re.search(r"^## 9\. Error codes$(.*?)^## 10\.", text, re.M | re.S)
    assert section, "docs/protocol.md has no section 9. Error codes"
    return set(re.findall(r"^\| `([a-z_]+)` \|", section[1], re.M))


DOCUMENTED = documented_codes()


def test_documented_codes_are_exactly_the_protocols_codes():
    named = {v for k, v in vars(Code).items() if k.isupper()}
    assert len(DOCUMENTED) >= 10  # the table was found and read
    assert named - DOCUMENTED == set(), "codes the server may send that are not documented"
    assert DOCUMENTED - named == set(), "documented codes that realtime.protocol.Code lacks"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
frames = st.one_of(  # the communicator cannot send an empty frame
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"op": st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "pong", "x"])},
        optional={
            "ref": json_values,
            "stream": st.one_of(st.text(max_size=30), json_values, st.just("project:1")),
            "since": json_values,
            "epoch": json_values,
            "version": json_values,
            "type": st.one_of(st.just("v1:typing.started"), json_values),
            "data": json_values,
        },
    ).map(json.dumps),
).filter(bool)


@pytest.mark.django_db(transaction=True)
def test_any_frame_gets_a_documented_answer():
    session = session_for(UserFactory(username="fuzzer"))

    async def exchange(frame: str) -> list[dict]:
        client = RealtimeClient(session_key=session)
        await client.connect()
        await client.send(frame)
        await client.send({"op": "ping", "ref": "after"})
        answers = []
        while True:
            message = await client.receive(timeout=5)
            if message.get("type") == "websocket.close":
                pytest.fail(f"closed on one frame: {message}")
            answers.append(message)
            if message.get("op") == "pong" and message.get("ref") == "after":
                break
        await client.close()
        return answers

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        # Fixed examples by default, so CI is repeatable; HYPOTHESIS_RANDOM=1 explores anew.
        derandomize=not os.environ.get("HYPOTHESIS_RANDOM"),
    )
    @given(frame=frames)
    def one_frame(frame: str) -> None:
        for answer in async_to_sync(exchange)(frame):
            text = json.dumps(answer)
            assert "Traceback" not in text
            assert "internal_error" not in text
            if answer["op"] == "reply" and not answer["ok"]:
                assert answer["error"]["code"] in DOCUMENTED

    one_frame()
