"""Consumer hooks: an app's hook object may define only the methods it needs."""

from __future__ import annotations

import logging

import pytest
from asgiref.sync import async_to_sync

from realtime import hooks


class OnlyConnected:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def connected(self, connection):
        self.seen.append(connection)


@pytest.fixture
def only_connected(monkeypatch):
    monkeypatch.setattr(hooks, "_registered", [])  # without presence's tracker
    registered = OnlyConnected()
    hooks.register_hooks(registered)
    return registered


def test_a_hook_object_without_a_method_is_skipped_quietly(only_connected, caplog):
    with caplog.at_level(logging.ERROR, logger="realtime.hooks"):
        assert async_to_sync(hooks.call)("connected", "c1") == [None]
        assert async_to_sync(hooks.call)("subscribed", "c1", "project:1", None) == []
        passed = async_to_sync(hooks.publishing)("c1", "project:1", None, "v1:x.y", {"a": 1})
    assert passed == {"data": {"a": 1}}
    assert only_connected.seen == ["c1"]
    assert caplog.records == []
