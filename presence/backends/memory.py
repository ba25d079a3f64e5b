"""In-process presence: for one process (`make run`, tests). Not shared between nodes."""

from __future__ import annotations

import threading
from typing import Any

from . import Change, Entry, PresenceBackend


class MemoryBackend(PresenceBackend):
    """Dicts under a lock; each method is atomic within the process."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._lock = threading.Lock()
        # stream -> {(user_id, connection_id): (expires_at, node)}
        self._entries: dict[str, dict[tuple[str, str], tuple[float, str]]] = {}
        # stream -> {user_id: [connection count, since]}
        self._users: dict[str, dict[str, list[float]]] = {}

    async def join(
        self,
        stream: str,
        user_id: str,
        connection_id: str,
        node: str,
        expires_at: float,
        now: float,
    ) -> bool:
        with self._lock:
            entries = self._entries.setdefault(stream, {})
            key = (user_id, connection_id)
            new = key not in entries
            entries[key] = (expires_at, node)
            if not new:
                return False
            users = self._users.setdefault(stream, {})
            state = users.get(user_id)
            if state is None:
                users[user_id] = [1, now]
                return True
            state[0] += 1
            return False

    def _remove(self, stream: str, user_id: str, connection_id: str) -> float | None:
        """The since of the user's presence when this was their last entry, else None."""
        entries = self._entries.get(stream, {})
        if entries.pop((user_id, connection_id), None) is None:
            return None
        if not entries:
            self._entries.pop(stream, None)
        users = self._users.get(stream, {})
        state = users.get(user_id)
        if state is None:
            return None
        state[0] -= 1
        if state[0] > 0:
            return None
        del users[user_id]
        if not users:
            self._users.pop(stream, None)
        return state[1]

    async def leave(self, stream: str, user_id: str, connection_id: str) -> float | bool:
        with self._lock:
            since = self._remove(stream, user_id, connection_id)
        return False if since is None else since

    async def refresh(
        self, entries: list[tuple[str, str, str]], node: str, expires_at: float, now: float
    ) -> list[Change]:
        joined = []
        for stream, user_id, connection_id in entries:
            if await self.join(stream, user_id, connection_id, node, expires_at, now):
                joined.append(Change(stream, user_id, now))
        return joined

    async def members(self, stream: str) -> dict[str, float]:
        with self._lock:
            return {user: state[1] for user, state in self._users.get(stream, {}).items()}

    async def expire(self, now: float, limit: int = 1000) -> list[Change]:
        left = []
        with self._lock:
            doomed = [
                (stream, user_id, connection_id)
                for stream, entries in self._entries.items()
                for (user_id, connection_id), (expires_at, _node) in entries.items()
                if expires_at < now
            ][:limit]
            for stream, user_id, connection_id in doomed:
                since = self._remove(stream, user_id, connection_id)
                if since is not None:
                    left.append(Change(stream, user_id, since))
        return left

    async def entries(self, limit: int = 1000) -> list[Entry]:
        with self._lock:
            return [
                Entry(stream, user_id, connection_id, node, expires_at)
                for stream, entries in sorted(self._entries.items())
                for (user_id, connection_id), (expires_at, node) in entries.items()
            ][:limit]
