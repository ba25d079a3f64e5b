"""Helpers for tests that run the demo project in a real daphne process."""

from __future__ import annotations

import http.cookiejar
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from django.db import connection

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """The URL of the database the running test uses, for a child process."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    if connection.vendor == "postgresql":
        auth = s["USER"] or ""
        if s.get("PASSWORD"):
            auth += ":" + urllib.parse.quote(s["PASSWORD"])
        return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    raise RuntimeError(f"no URL for {connection.vendor}")


class Daphne:
    """A daphne process serving config.asgi on a free loopback port."""

    name = "daphne"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
            "config.asgi:application",
        ]

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log
        self.env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daphne:
        self.log = open(self.log_path, "wb")  # closed in __exit__
        self.process = subprocess.Popen(
            self.command(), cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.url("/admin/login/"), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n" + self.output()) from None
                time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Browser:
    """A cookie-keeping HTTP client that logs in and posts forms with their CSRF token."""

    def __init__(self, server: Daphne) -> None:
        self.server = server
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> str:
        with self.opener.open(self.server.url(path), timeout=10) as response:
            return response.read().decode()

    def post_form(self, path: str, fields: dict[str, Any], headers: dict[str, str]) -> Any:
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', self.get(path))
        assert token, f"no CSRF token on {path}"
        body = urllib.parse.urlencode({**fields, "csrfmiddlewaretoken": token[1]}).encode()
        request = urllib.request.Request(self.server.url(path), data=body, headers=headers)
        return self.opener.open(request, timeout=10)

    def login(self, username: str, password: str) -> None:
        self.post_form(
            "/admin/login/?next=/admin/", {"username": username, "password": password}, {}
        ).close()
