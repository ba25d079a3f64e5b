"""The durable per-stream event log: `Stream` (position, epoch) and `Event` (one change)."""

from __future__ import annotations

import secrets
import uuid

from django.conf import settings
from django.db import models

from .events import EventJSONEncoder


def new_epoch() -> str:
    """Return a new random stream epoch."""
    return secrets.token_hex(8)


class Stream(models.Model):
    """A named stream; `last_seq` is the seq of its newest event, `epoch` names its history."""

    name = models.CharField(max_length=161, unique=True)
    last_seq = models.BigIntegerField(default=0)
    epoch = models.CharField(max_length=32, default=new_epoch)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "stream"

    def __str__(self) -> str:
        return f"{self.name} @ {self.last_seq}"


class Event(models.Model):
    """One logged event: the outbox row the publisher sends and the history replay reads."""

    # The (stream, seq) unique index serves replay, so the FK needs no index of its own.
    stream = models.ForeignKey(
        Stream, on_delete=models.CASCADE, related_name="events", db_index=False
    )
    seq = models.BigIntegerField()
    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    type = models.CharField(max_length=100)
    timestamp = models.DateTimeField(db_index=True)
    correlation_id = models.CharField(max_length=128, blank=True, default="")
    data = models.JSONField(encoder=EventJSONEncoder, default=dict)
    # Payloads of the other registered versions: {"v2": {"type": ..., "data": ...}}.
    variants = models.JSONField(encoder=EventJSONEncoder, default=dict, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "event"
        constraints = [
            models.UniqueConstraint(fields=["stream", "seq"], name="realtime_event_stream_seq"),
        ]
        indexes = [
            # The relay's scan: unpublished events, oldest first.
            models.Index(
                fields=["timestamp"],
                name="realtime_event_unpublished",
                condition=models.Q(published_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.stream_id}#{self.seq}"


class Connection(models.Model):
    """A live socket (or SSE stream) on one node; removed on disconnect, swept if the node dies."""

    id = models.CharField(max_length=32, primary_key=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="realtime_connections",
    )
    tenant = models.CharField(max_length=128, blank=True, default="")
    node = models.CharField(max_length=128, db_index=True)
    transport = models.CharField(max_length=16, default="websocket")
    client_version = models.CharField(max_length=32, blank=True, default="")
    remote_addr = models.CharField(max_length=64, blank=True, default="")
    subscriptions = models.JSONField(default=list, blank=True)
    connected_at = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "live connection"

    def __str__(self) -> str:
        return f"{self.id} ({self.transport} on {self.node})"


class UsedTicket(models.Model):
    """The nonce of a WebSocket ticket that was already used; tickets are single-use."""

    nonce = models.CharField(max_length=32, primary_key=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.nonce


class IdempotencyRecord(models.Model):
    """The first response to a POST with an `Idempotency-Key`, replayed for its retries."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    key = models.CharField(max_length=128)
    fingerprint = models.CharField(max_length=64)  # method, path and body of the request
    status = models.PositiveSmallIntegerField(null=True)  # null while the first one runs
    body = models.TextField(blank=True, default="")
    headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="realtime_idempotency_user_key")
        ]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.key}"
