import datetime as dt
import json
import uuid

from realtime.events import Envelope, format_timestamp, is_valid_type


def make(**kw):
    defaults = dict(
        stream="project:1",
        seq=7,
        event_id=uuid.UUID(int=5),
        type="v1:item.updated",
        timestamp=dt.datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=dt.UTC),
        correlation_id="abc",
        data={"id": 1, "title": "é"},
    )
    defaults.update(kw)
    return Envelope(**defaults)


def test_timestamp_is_utc_with_milliseconds():
    tz = dt.timezone(dt.timedelta(hours=2))
    value = dt.datetime(2026, 11, 27, 14, 0, 0, 123999, tzinfo=tz)
    assert format_timestamp(value) == "2026-11-27T12:00:00.123Z"


def test_frame_matches_the_wire_contract():
    frame = make().frame()
    assert frame == {
        "op": "event",
        "stream": "project:1",
        "seq": 7,
        "eventId": "00000000-0000-0000-0000-000000000005",
        "type": "v1:item.updated",
        "timestamp": "2026-11-27T12:00:00.123Z",
        "correlationId": "abc",
        "data": {"id": 1, "title": "é"},
    }


def test_frames_are_serialized_once_per_version():
    env = make(variants={"v2": ("v2:item.updated", {"id": 1, "name": "x"})})
    frames = env.frames()
    assert set(frames) == {"v1", "v2"}
    assert json.loads(frames["v1"])["type"] == "v1:item.updated"
    v2 = json.loads(frames["v2"])
    assert v2["type"] == "v2:item.updated"
    assert v2["data"] == {"id": 1, "name": "x"}
    assert v2["eventId"] == json.loads(frames["v1"])["eventId"]


def test_empty_correlation_id_is_null():
    assert make(correlation_id="").frame()["correlationId"] is None


def test_event_types():
    assert is_valid_type("v1:item.updated")
    assert is_valid_type("v12:notification.created")
    for bad in [
        "item.updated",
        "v0:item.updated",
        "v1:Item.updated",
        "v1:item",
        "v1:item.up-d",
        "v1:a.b\n",
    ]:
        assert not is_valid_type(bad)
