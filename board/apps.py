from django.apps import AppConfig


class BoardConfig(AppConfig):
    name = "board"
    verbose_name = "Demo board"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import policies  # noqa: F401  (registers the stream kinds)
