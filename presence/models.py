"""No tables: presence lives in its backend. `Presence` only gives the admin a page and a
`view_presence` permission to guard it."""

from django.db import models


class Presence(models.Model):
    class Meta:
        managed = False
        default_permissions = ("view",)
        verbose_name = "present user"
        verbose_name_plural = "presence"

    def __str__(self) -> str:
        return "presence"
