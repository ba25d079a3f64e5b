"""Create the demo users and data, and print their logins."""

from typing import Any

from django.core.management.base import BaseCommand

from board.demo import seed


class Command(BaseCommand):
    help = "Create the demo users (alice, bob, carol) and their projects; safe to run again."

    def handle(self, *args: Any, **options: Any) -> None:
        from django.contrib.auth import get_user_model

        users = seed()
        accounts = get_user_model().objects.in_bulk(
            [u.username for u in users], field_name="username"
        )
        self.stdout.write("Demo logins (http://127.0.0.1:8000/accounts/login/):")
        for user in users:
            account = accounts.get(user.username)
            # A demo user whose password was changed since keeps it: printing the demo one
            # would print a login that does not work.
            works = account is not None and account.check_password(user.password)
            password = user.password if works else "(password changed; not shown)"
            self.stdout.write(f"  {user.username:<6} / {password:<14}  {user.note}")
