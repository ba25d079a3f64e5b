"""Reading the log for resume: stream positions and events after a seq, in bounded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Min

from .events import Envelope
from .models import Event, Stream


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream is: its newest seq, its epoch, and the oldest seq still kept."""

    seq: int
    epoch: str | None
    first_kept: int

    def covers(self, since: int, epoch: str | None) -> bool:
        """Whether every event after `since` is still in the log (and the epoch matches)."""
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            return False
        if since > self.seq:
            return False
        return since >= self.first_kept - 1


def position(stream: str) -> StreamPosition:
    row = Stream.objects.filter(name=stream).values_list("pk", "last_seq", "epoch").first()
    if row is None:
        return StreamPosition(seq=0, epoch=None, first_kept=1)
    pk, last_seq, epoch = row
    first = Event.objects.filter(stream_id=pk).aggregate(first=Min("seq"))["first"]
    return StreamPosition(
        seq=last_seq, epoch=epoch, first_kept=last_seq + 1 if first is None else first
    )


def last_seq(stream: str) -> int:
    """The stream's newest seq (0 before its first event), in one query."""
    seq = Stream.objects.filter(name=stream).values_list("last_seq", flat=True).first()
    return seq or 0


def read_typed_after(
    stream: str, after: int, limit: int
) -> list[tuple[int, str, dict[str, str], Any]]:
    """Up to `limit` (seq, type, frames by version, timestamp) of the events after `after`."""
    rows = (
        Event.objects.filter(stream__name=stream, seq__gt=after)
        .order_by("seq")
        .only("seq", "event_id", "type", "timestamp", "correlation_id", "data", "variants")[:limit]
    )
    return [
        (row.seq, row.type, Envelope.from_row(row, stream=stream).frames(), row.timestamp)
        for row in rows
    ]
