"""The helpers of realtime.testing that host projects use in their own tests."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from realtime.testing import record_group_sends


def test_nested_recorders_each_record_and_restore_the_layer():
    layer = get_channel_layer()

    def send(group, message):
        async_to_sync(layer.group_send)(group, message)  # looked up at each call

    with record_group_sends() as outer:
        with record_group_sends() as inner:
            send("rt.a", {"type": "x"})
        send("rt.b", {"type": "x"})  # the outer recorder still listens
    send("rt.c", {"type": "x"})  # neither does any more
    assert [group for group, _ in inner] == ["rt.a"]
    assert [group for group, _ in outer] == ["rt.a", "rt.b"]
    assert "group_send" not in vars(layer)
