from django.apps import AppConfig


class PresenceConfig(AppConfig):
    name = "presence"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Presence"

    def ready(self) -> None:
        from realtime.hooks import register_hooks

        from . import checks  # noqa: F401  (registers the system checks)
        from .tracker import tracker

        register_hooks(tracker)
