"""Create the demo users and data, and print their logins."""

from typing import Any

from django.core.management.base import BaseCommand

from board.demo import seed


class Command(BaseCommand):
    help = "Create the demo users (alice, bob, carol) and their projects; safe to run again."

    def handle(self, *args: Any, **options: Any) -> None:
        users = seed()
        self.stdout.write("Demo logins (http://127.0.0.1:8000/accounts/login/):")
        for user in users:
            self.stdout.write(f"  {user.username:<6} / {user.password:<14}  {user.note}")
