"""Presence backends: where entries live. One small interface, two implementations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Change:
    """A user who joined (first connection) or left (last connection) a stream.

    `since`: when that presence began (for a leave, the one it ends; 0.0 when unknown).
    """

    stream: str
    user_id: str
    since: float = 0.0


@dataclass(frozen=True)
class Entry:
    """One connection of one user present in one stream (for the admin)."""

    stream: str
    user_id: str
    connection_id: str
    node: str
    expires_at: float


class PresenceBackend:
    """Connection entries per stream with expiry; users derived from them.

    Every method is atomic on its own: `join` reports True only for a user's first live
    connection in the stream, `leave` and `expire` report a user only for their last one, so
    a join or leave is announced exactly once however many tabs, nodes or sweepers race.
    Times are UNIX seconds (the nodes' clocks are assumed in step, as with NTP).
    """

    def __init__(self, **config: Any) -> None:
        self.config = config

    async def join(
        self,
        stream: str,
        user_id: str,
        connection_id: str,
        node: str,
        expires_at: float,
        now: float,
    ) -> bool:
        """Add or refresh an entry; True when this is the user's first connection there."""
        raise NotImplementedError

    async def leave(self, stream: str, user_id: str, connection_id: str) -> float | bool:
        """Remove an entry; when it was the user's last connection there, the `since` of the
        presence that ends (or True if the backend does not know it), else False."""
        raise NotImplementedError

    async def refresh(
        self, entries: list[tuple[str, str, str]], node: str, expires_at: float, now: float
    ) -> list[Change]:
        """Push back the expiry of a node's live (stream, user_id, connection_id) entries.

        An entry that was swept meanwhile (the node stalled past the TTL) is added again, and
        its user is returned when that made them present again (announce a join).
        """
        raise NotImplementedError

    async def members(self, stream: str) -> dict[str, float]:
        """{user_id: since} of the users present in a stream."""
        raise NotImplementedError

    async def members_many(self, streams: list[str]) -> dict[str, dict[str, float]]:
        """`members` of each stream ({stream: {user_id: since}}); override it to read them in
        fewer round trips (the Redis backend pipelines them). One `members` each by default."""
        return {stream: await self.members(stream) for stream in streams}

    async def expire(self, now: float, limit: int = 1000) -> list[Change]:
        """Remove entries that expired before `now`; return the users who thereby left (with
        the `since` of the presence each ended)."""
        raise NotImplementedError

    async def entries(self, limit: int = 1000) -> list[Entry]:
        """Entries of every stream, for inspection (the admin)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections held for the running event loop."""
