"""A user's notifications and their preferences."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models import Q

from realtime.events import EventJSONEncoder

LEVELS = ("success", "info", "warning", "error")
LEVEL_CHOICES = [(level, level) for level in LEVELS]


class NotificationQuerySet(models.QuerySet["Notification"]):
    def visible(self) -> NotificationQuerySet:
        """Not soft-deleted."""
        return self.filter(deleted_at__isnull=True)

    def unread(self) -> NotificationQuerySet:
        return self.visible().filter(read_at__isnull=True)

    def for_user(self, user: Any) -> NotificationQuerySet:
        """The user's own visible notifications (none for an anonymous user)."""
        if user is None or not user.is_authenticated:
            return self.none()
        return self.visible().filter(recipient=user)


def _generic(name: str) -> tuple[Any, Any, Any]:
    # SET_NULL: a content type removed with its model (`remove_stale_contenttypes`) must not
    # delete users' notifications, silently and with no event; each keeps its `refs` copy.
    content_type = models.ForeignKey(
        ContentType,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    object_id = models.CharField(max_length=255, blank=True, default="")
    return content_type, object_id, GenericForeignKey(f"{name}_content_type", f"{name}_object_id")


class Notification(models.Model):
    """Something that happened, for one recipient: `actor` `verb` `action_object` on `target`."""

    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    verb = models.CharField(max_length=255)
    level = models.CharField(max_length=16, choices=LEVEL_CHOICES, default="info")
    actor_content_type, actor_object_id, actor = _generic("actor")
    target_content_type, target_object_id, target = _generic("target")
    action_object_content_type, action_object_object_id, action_object = _generic("action_object")
    #: Display strings of the related objects when the notification was made, so reading a
    #: list needs no query per row (and survives the objects' deletion).
    refs = models.JSONField(default=dict, blank=True)
    # Stored as its event carries it: dates, decimals and UUIDs as strings (NaN refused).
    data = models.JSONField(encoder=EventJSONEncoder, default=dict, blank=True)
    created_at = models.DateTimeField(db_index=True)
    read_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = NotificationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # A recipient's list, newest first, and the unread count.
            models.Index(fields=["recipient", "-created_at", "-id"], name="notif_recipient_recent"),
            models.Index(
                fields=["recipient"],
                condition=Q(read_at__isnull=True, deleted_at__isnull=True),
                name="notif_recipient_unread",
            ),
        ]

    def __str__(self) -> str:
        actor = self.refs.get("actor", {}).get("repr") if self.refs else None
        return f"{actor or 'someone'} {self.verb}"

    @property
    def unread(self) -> bool:
        return self.read_at is None


class Preference(models.Model):
    """What a user does not want pushed live (such notifications are still stored)."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notification_preference"
    )
    muted_verbs = models.JSONField(default=list, blank=True)
    muted_levels = models.JSONField(default=list, blank=True)

    def __str__(self) -> str:
        return f"notification preferences of {self.user}"

    def mutes(self, verb: str, level: str) -> bool:
        return verb in (self.muted_verbs or []) or level in (self.muted_levels or [])
