from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from realtime.policies import UserPolicy, stream_kinds

        from . import checks  # noqa: F401  (registers the system checks)

        # Notifications travel on `user:<id>`; a host project may register its own policy.
        if stream_kinds.get("user") is None:
            stream_kinds.register("user", UserPolicy)
