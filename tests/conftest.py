"""Service detection (skip, or fail under CI), publisher hygiene, shared fixtures."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
from django.db import connection

REQUIRE_SERVICES = os.environ.get("CI", "").lower() == "true" or os.environ.get(
    "REALTIME_REQUIRE_SERVICES", ""
) in {"1", "true", "yes"}


def _fast_postgresql_flush() -> None:
    """Empty PostgreSQL's tables after a transactional test with DELETE, not TRUNCATE.

    Django flushes the database after every `transaction=True` test with one TRUNCATE of
    every table: about 0.25 s on PostgreSQL here (new files for each table), more than most
    of those tests take to run, and most of the suite's time on PostgreSQL. The tables hold
    a few rows each, which DELETE removes in milliseconds. Foreign-key triggers are off for
    the flush's transaction (`session_replication_role`, as the `postgres` superuser the
    suite connects as), so any order will do; a reset of sequences still truncates. Every
    table is emptied, content types and permissions too, as TRUNCATE does (a test that resets
    sequences restarts them at 1 before it runs, which kept rows would then collide with).
    """
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def sql_flush(
        self: Any,
        style: Any,
        tables: Any,
        *,
        reset_sequences: bool = False,
        allow_cascade: bool = False,
    ) -> list[str]:
        if reset_sequences or not tables:
            return truncate(
                self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade
            )
        return [
            "SET LOCAL session_replication_role = replica",
            *(f"DELETE FROM {self.quote_name(table)}" for table in tables),
        ]

    DatabaseOperations.sql_flush = sql_flush  # type: ignore[method-assign]


if os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
    _fast_postgresql_flush()


def need(ok: bool, reason: str) -> None:
    """Skip the test when a service is missing; fail instead under CI or REQUIRE_SERVICES."""
    if ok:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"required service missing: {reason}", pytrace=False)
    pytest.skip(reason)


def _redis_answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 6379), 1
        ) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_names() -> str:
    """A key prefix of one test's own in the run's Redis, under the run's names, so that it
    is deleted with them when the run ends (`pytest_sessionfinish`)."""
    import uuid

    return f"{os.environ.get('REDIS_PREFIX') or 'test'}.{uuid.uuid4().hex}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Delete the keys this process's tests left in the run's Redis (their names hold the
    run's tag: tests/settings_test.py), so runs do not pile them up there."""
    url = os.environ.get("REDIS_URL")
    prefix = os.environ.get("REDIS_PREFIX", "")
    if not url or "test-" not in prefix:
        return
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        for key in client.scan_iter(match=f"{prefix}.*", count=1000):
            client.delete(key)
        client.close()
    except Exception:  # the run's result stands whatever happens here
        pass


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("redis"):
        url = os.environ.get("REDIS_URL", "")
        need(bool(url), "REDIS_URL is not set (channels-redis tests need a Redis server)")
        need(_redis_answers(url), f"Redis at {url} does not answer PING")
    if item.get_closest_marker("postgres"):
        need(
            connection.vendor == "postgresql",
            f"needs PostgreSQL (DATABASE_URL); the database is {connection.vendor}",
        )


@pytest.fixture(scope="session", autouse=True)
def _collect_thread_connections(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Before the test database is dropped: collect the database connections that finished
    worker threads (`thread_sensitive=False` executors) left behind, which close when
    collected, and end any other session on it, so PostgreSQL does not refuse the drop."""
    yield
    import gc

    gc.collect()
    if connection.vendor == "postgresql":
        # A daemon thread a test left (a client's reader, a pool worker) may still hold one.
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        connection.close()


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Empty Django's default cache (DRF's throttle counts live there) before each test."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True)
def _drain_publisher() -> Iterator[None]:
    """Let each test's publishes finish inside it, so none leaks into the next; then close
    the ack thread's database connection so the test database can be dropped."""
    from realtime.publisher import publisher
    from realtime.testing import close_db_connections

    yield
    publisher.flush(timeout=5)
    publisher.resume()
    close_db_connections()
    # Async tests run their sync_to_async calls on asgiref's one shared thread; close the
    # connection it opened, or PostgreSQL refuses to drop the test database at the end.
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a free port, which the test may stop and start."""

    def __init__(self, tmp_path: os.PathLike[str]) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_answers(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: os.PathLike[str]) -> Iterator[PrivateRedis]:
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the item (`rep_call`), for fixtures that save artifacts."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.when == "call" and report.failed:
        _keep_logs(item)
    return report


def _keep_logs(item: pytest.Item) -> None:
    """Copy the server logs a failed test wrote in its tmp_path (daphne, redis-server) to
    test-artifacts/<test>/: pytest keeps only the last few tmp dirs."""
    from pathlib import Path

    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    logs = sorted(Path(tmp).rglob("*.log")) if tmp is not None else []
    if not logs:
        return
    target = Path(__file__).resolve().parent.parent / "test-artifacts" / item.name
    target.mkdir(parents=True, exist_ok=True)
    for log in logs:
        shutil.copyfile(log, target / log.name)


@pytest.fixture
def item_v2() -> Iterator[None]:
    """Items registered for v2 too, next to the board's v1."""
    import realtime
    from board.models import Item

    realtime.register(
        Item,
        streams="project:{project_id}",
        version="v2",
        serializer=lambda item: {"id": item.pk, "label": item.title},
    )
    yield
    realtime.registry.registry.unregister(Item, version="v2")
