from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Realtime"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth.models import Permission
        from django.db.models.signals import post_delete, post_migrate, post_save

        from . import checks  # noqa: F401  (registers the system checks)
        from .conditional import forget_permission_codenames
        from .invalidation import connect

        connect()
        # parent_state maps permission ids to codenames from a per-process table.
        for signal in (post_save, post_delete):
            signal.connect(forget_permission_codenames, sender=Permission, weak=False)
        post_migrate.connect(forget_permission_codenames, weak=False)
