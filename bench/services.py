"""The databases and the Redis server a benchmark uses, all on this machine's loopback."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

#: The PostgreSQL database a run creates and drops (by default); never the tests' `test`.
BENCH_DATABASE = "bench_realtime"
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Unavailable(Exception):
    """A service the benchmark would use is not there; the part that needs it is skipped."""


def require_loopback(url: str) -> None:
    """Refuse a URL whose host is not on this machine's loopback."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Unavailable(f"{host or url!r} is not a loopback address; benchmarks stay local")


def redact(url: str) -> str:
    """Return the URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def redis_answers(url: str) -> None:
    """Raise Unavailable unless the Redis server at `url` answers PING within a second."""
    require_loopback(url)
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 6379)
    try:
        with socket.create_connection(address, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(16)
    except OSError as exc:
        raise Unavailable(f"Redis at {redact(url)} is not answering ({exc})") from None
    if not reply.startswith(b"+PONG"):
        raise Unavailable(f"Redis at {redact(url)} answered {reply!r} to PING")


@contextmanager
def sqlite_database() -> Iterator[str]:
    """Yield the URL of a fresh SQLite file in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-realtime-") as folder:
        yield f"sqlite:///{Path(folder) / 'bench.sqlite3'}"


@contextmanager
def postgres_database(server_url: str, name: str = BENCH_DATABASE) -> Iterator[str]:
    """Create database `name` on the server of `server_url`, yield its URL, then drop it."""
    import psycopg
    from psycopg import sql

    require_loopback(server_url)
    admin_url = urlsplit(server_url)._replace(path="/postgres").geturl()
    statements = {
        "drop": sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        "create": sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)),
    }

    def run(*names: str) -> None:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            for name in names:
                conn.execute(statements[name])

    try:
        run("drop", "create")
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise Unavailable(
            f"PostgreSQL at {redact(admin_url)} is not answering ({reason})"
        ) from None
    try:
        yield urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        run("drop")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Runs in each child before it becomes the real program: die with the parent (even when
#: it is SIGKILLed) and raise the open-file limit to the hard limit.
LAUNCHER = (
    "import ctypes, os, resource, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def spawn(argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a child through LAUNCHER, in the repository root."""
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, sys.executable, *argv], cwd=ROOT, env=env, **kwargs
    )


def stop(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Terminate a child we started, then kill it if it does not exit within `grace`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
