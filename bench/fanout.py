"""Fan-out over WebSockets: ours vs plain Channels, DCRF and a bare `websockets` ceiling; JSON.

Needs PostgreSQL and Redis on the loopback (skipped with the reason otherwise). Per system, two
server processes on free loopback ports; per subscriber count, one load client process
(bench/fanout_client.py) with the subscribers split evenly over the two nodes; this process
is the writer, saving `Item`s of one project (ours on uvicorn: another) through the ORM.
Progress goes to stderr, the result (for `bench/run.py`) to stdout as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from services import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    Unavailable,
    free_port,
    postgres_database,
    redact,
    redis_answers,
    spawn,
    stop,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BENCHMARK = "Fan-out over WebSockets"
DATABASE = "bench_fanout"
SETTINGS = "fanout_settings"
SYSTEMS = ("ours", "plain Channels", "DCRF", "ceiling")
#: Diagnostics, run only when named in --systems: where the gap to the ceiling comes from.
DIAGNOSTICS = ("ours on uvicorn", "daphne floor")
#: The systems serving config.asgi (the pipeline on, `subscribe` frames).
OURS = ("ours", "ours on uvicorn")
# The latency target's pair and the two diagnostics, measured again in blocks taking turns
# (see run_interleaved); 8 blocks put each of the four first, second, third and last twice.
INTERLEAVED = ("ours", "ours on uvicorn", "daphne floor", "ceiling")
INTERLEAVED_BLOCKS = 8
INTERLEAVED_EVENTS = 10
#: django-channels-rest-framework (the `bench` extra): its nodes' settings and ASGI app.
DCRF_PACKAGE = "djangochannelsrestframework"
DCRF_SETTINGS = "fanout_dcrf_settings"
#: Its consumer's path and subscribe action (bench/fanout_dcrf.py), and the action's reply:
#: which frame it is, and when it says yes (DCRF replies 403/404 with errors otherwise).
DCRF_PATH = "/ws/dcrf/"
DCRF_ACTION = "subscribe_to_items"
DCRF_REPLY = rf'"action":\s*"{DCRF_ACTION}"'
DCRF_OK = r'"response_status":\s*200\b'
DEFAULT_SUBSCRIBERS = (100, 1000, 5000)
DEFAULT_RATES = (50, 200, 500, 1000)
SINGLE_EVENTS = 20
WARMUP_EVENTS = 3
#: Seconds per rate step, shortened so a step offers at most STEP_FRAMES frames (never below
#: MIN_STEP_SECONDS): at 5,000 subscribers a long step only measures the backlog for longer.
STEP_SECONDS = 2.0
MIN_STEP_SECONDS = 1.0
STEP_FRAMES = 200_000
#: Waiting for an event (or a step's events) to arrive: give up after TIMEOUT seconds, or
#: after QUIET seconds in which no event frame arrived at all (what is missing then is lost).
SINGLE_TIMEOUT, STEP_TIMEOUT, QUIET = 15.0, 25.0, 2.0
#: A step is saturated when less than this share of the offered frames/s is delivered.
SATURATED_BELOW = 0.9
USERS_PER_SUBSCRIBERS = 20
#: Targets from the issue.
TARGET_THROUGHPUT_X = 3.0
TARGET_LATENCY_X = 1.5
# Runs in each child before it becomes the real program: die with this process (even when it
# is SIGKILLed) and raise the open-file limit to the hard limit.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: CPU use per phase: each of our processes, and the rest of the machine's busy time (Redis,
#: PostgreSQL and any other program), in % of one processor; the machine in % of all of them.
CPU_COLUMNS = ("node a", "node b", "client", "writer", "rest", "machine")
PROCESSORS = len(os.sched_getaffinity(0))
#: A round is flagged when the machine was busier than this in the second before it started,
#: a phase when the rest of the machine (Redis, PostgreSQL, other programs) used more than
#: REST_WARNING of a processor (Redis and PostgreSQL alone stay under 0.3 in quiet runs).
BUSY_WARNING = 0.15
REST_WARNING = 0.5


def progress(message: str) -> None:
    print(f"[fanout] {message}", file=sys.stderr, flush=True)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (all threads); this process's if pid is None."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all processors since boot, from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU use from now on: each process in share of one processor, the machine of all."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.machine = machine_ticks()
        self.wall = time.monotonic()

    def read(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.wall
        cpu = {
            name: (cpu_seconds(pid) - self.before[name]) / elapsed
            for name, pid in self.pids.items()
        }
        busy, total = machine_ticks()
        cpu["machine"] = (busy - self.machine[0]) / max(1, total - self.machine[1])
        ours = sum(value for value in cpu.values() if not math.isnan(value)) - cpu["machine"]
        cpu["rest"] = max(0.0, cpu["machine"] * PROCESSORS - ours)
        return cpu


def cpu_text(cpu: dict[str, float]) -> str:
    return "CPU " + ", ".join(f"{name} {value:.0%}" for name, value in cpu.items())


# -- servers -----------------------------------------------------------------------------


@dataclass
class Node:
    """One server process on a free loopback port, its output in a log file."""

    name: str
    port: int
    process: subprocess.Popen[Any]
    log: Path

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_nodes(
    system: str, env: dict[str, str], folder: Path, stack: contextlib.ExitStack
) -> list[Node]:
    """Start the two server processes of a system and wait until both accept connections."""
    nodes = []
    for letter in "ab":
        port = free_port()
        if system == "ceiling":
            argv = [str(BENCH / "fanout_ceiling.py"), "--port", str(port)]
            argv += ["--redis-url", env["REDIS_URL"]]
        elif system == "ours on uvicorn":
            argv = ["-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)]
            argv += ["--ws", "websockets-sansio", "--log-level", "warning", "--no-access-log"]
            argv += ["config.asgi:application"]
        elif system == "daphne floor":
            argv = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0"]
            argv += ["--websocket_connect_timeout", "120", "fanout_daphne_floor:application"]
        else:
            app = {
                "ours": "config.asgi:application",
                "plain Channels": "fanout_plain:application",
                "DCRF": "fanout_dcrf:application",
            }[system]
            argv = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0"]
            argv += ["--websocket_connect_timeout", "120", app]
        # DCRF sends through the default layer: its nodes get a RedisChannelLayer there.
        node_env = {**env, "DJANGO_SETTINGS_MODULE": DCRF_SETTINGS} if system == "DCRF" else env
        log = folder / f"{system.replace(' ', '-')}-{letter}.log"
        with open(log, "wb") as out:
            process = spawn(argv, node_env, stdout=out, stderr=subprocess.STDOUT)
        stack.callback(stop, process)
        nodes.append(Node(f"node {letter}", port, process, log))
    deadline = time.monotonic() + 60
    for node in nodes:
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", node.port), 1),
            ):
                break
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{system} {node.name} did not start:\n{node.tail()}")
            time.sleep(0.1)
    return nodes


# -- load client -------------------------------------------------------------------------


class LoadClient:
    """The load client process: JSON-line commands on its stdin, answers on its stdout."""

    def __init__(self, argv: list[str], env: dict[str, str], stack: contextlib.ExitStack) -> None:
        self.process = spawn(
            [str(BENCH / "fanout_client.py"), *argv],
            env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        stack.callback(stop, self.process)
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"load client silent for {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"load client exited ({self.process.wait(5)})")
        result: dict[str, Any] = json.loads(line)
        return result

    def command(self, seconds: float, **command: Any) -> dict[str, Any]:
        """Send a command and return the answer, waiting at most `seconds` for it."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.answer(seconds)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.command(120, cmd="close")
        stop(self.process, grace=10)


# -- Django: fixtures and writers ------------------------------------------------------


def setup_django(database_url: str, redis_url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    # Channel-layer prefix and ceiling channel of this run alone (see fanout_settings).
    os.environ["BENCH_FANOUT_PREFIX"] = f"bench-fanout-{os.getpid()}"
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    for path in (str(ROOT), str(BENCH)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


NAMES = ("Fan-out", "Fan-out on uvicorn")


@dataclass
class Projects:
    """The project every system's subscribers follow, and one for ours on uvicorn alone.

    Ours on uvicorn shares ours' channel layer: on the same project its nodes would get
    ours' events too, and the other way round. Both have the same members.
    """

    main: Any
    uvicorn: Any

    def of(self, system: str) -> Any:
        return self.uvicorn if system == "ours on uvicorn" else self.main


def make_fixtures(subscribers: int, cookie_file: Path) -> Projects:
    """The projects; a member per 20 subscribers with a session each; session keys to a file."""
    from django.conf import settings
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.sessions.backends.db import SessionStore

    from board.membership import add_member, create_project
    from board.models import Organization

    users = get_user_model()
    owner = users.objects.create_user("bench-owner", password=None)
    organization = Organization.objects.create(name="Bench fan-out")
    projects = Projects(
        *(create_project(organization=organization, name=name, owner=owner) for name in NAMES)
    )
    keys = []
    for i in range(math.ceil(subscribers / USERS_PER_SUBSCRIBERS)):
        user = users.objects.create_user(f"bench-{i}", password=None)
        add_member(projects.main, user)
        add_member(projects.uvicorn, user)
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        keys.append(str(session.session_key))
    # Subscriber i uses keys[i // 20]: the client cycles through the file, so repeat each key.
    cookie_file.write_text("\n".join(key for key in keys for _ in range(USERS_PER_SUBSCRIBERS)))
    return projects


def plain_receiver() -> Callable[..., None]:
    """A post_save receiver publishing the plain-Channels way: async_to_sync per save."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer
    from fanout_plain import LAYER, MESSAGE_TYPE, group

    from board.serializers import ItemSerializer

    def receiver(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
        message = {
            "type": MESSAGE_TYPE,
            "created": created,
            "item": dict(ItemSerializer(instance).data),
        }
        async_to_sync(get_channel_layer(LAYER).group_send)(group(instance.project_id), message)

    return receiver


@contextlib.contextmanager
def dcrf_receivers() -> Iterator[None]:
    """DCRF's signal receivers of bench/fanout_dcrf.py's model observer, connected meanwhile.

    `@model_observer` connects them (post_init, post_save, post_delete of Item) when the
    consumer class is defined, i.e. when fanout_dcrf is first imported; they are disconnected
    on the way out, so that no other system's saves pay for them.
    """
    from django.db.models.signals import post_delete, post_init, post_save
    from fanout_dcrf import ItemsConsumer

    from board.models import Item

    observer: Any = ItemsConsumer.item_activity  # the ModelObserver (read on the class)
    observer._connect()  # DCRF's own connect; a no-op when the import just connected them
    try:
        yield
    finally:
        uid = str(id(observer))  # the dispatch_uid DCRF connects them with
        for signal in (post_init, post_save, post_delete):
            signal.disconnect(sender=Item, dispatch_uid=uid)


@contextlib.contextmanager
def writer(system: str, projects: Projects, redis_url: str) -> Iterator[Callable[[int], None]]:
    """Yield save(n): create one Item titled `bench <n> <time.time()>` the system's way."""
    project = projects.of(system)
    from django.conf import settings
    from django.db.models.signals import post_save
    from django.test import override_settings

    from board.models import Item

    if system in OURS:
        yield save_item(project)
        return
    with override_settings(REALTIME={**settings.REALTIME, "ENABLED": False}):
        if system == "plain Channels":
            uid = "bench-fanout-plain"
            post_save.connect(plain_receiver(), sender=Item, dispatch_uid=uid, weak=False)
            try:
                yield save_item(project)
            finally:
                post_save.disconnect(sender=Item, dispatch_uid=uid)
            return
        if system == "DCRF":
            from fanout_dcrf_settings import DCRF_LAYER

            # DCRF sends with get_channel_layer(): the default alias, here the nodes' layer
            # (channels drops its cached layers on setting_changed for CHANNEL_LAYERS).
            layers = {**settings.CHANNEL_LAYERS, "default": settings.CHANNEL_LAYERS[DCRF_LAYER]}
            with override_settings(CHANNEL_LAYERS=layers), dcrf_receivers():
                yield save_item(project)
            return
        import redis
        from fanout_ceiling import CHANNEL, FLOOR_CHANNEL

        client = redis.Redis.from_url(redis_url, socket_timeout=10)
        channel = FLOOR_CHANNEL if system == "daphne floor" else CHANNEL
        try:
            yield save_ceiling(project, client, channel)
        finally:
            client.close()


def save_item(project: Any) -> Callable[[int], None]:
    """save(n) for ours (pipeline on), plain Channels and DCRF (their post_save receivers)."""
    from board.models import Item

    def save(n: int) -> None:
        Item(project=project, title=f"bench {n} {time.time():.6f}", position=n).save()

    return save


def save_ceiling(project: Any, client: Any, channel: str) -> Callable[[int], None]:
    """save(n) for the ceiling and the daphne floor: save, then publish one encoded frame."""
    from board.models import Item
    from board.serializers import ItemSerializer
    from realtime.events import dumps

    stream = f"project:{project.pk}"

    def save(n: int) -> None:
        item = Item(project=project, title=f"bench {n} {time.time():.6f}", position=n)
        item.save()
        frame = {"op": "event", "stream": stream, "type": "v1:item.created"}
        client.publish(channel, dumps({**frame, "data": ItemSerializer(item).data}))

    return save


# -- one round: a system, a subscriber count -------------------------------------------


@dataclass
class Round:
    system: str
    subscribers: int
    ready: int = 0
    connect_seconds: float = math.nan
    failures: dict[str, int] = field(default_factory=dict)
    single: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    skipped_rates: list[int] = field(default_factory=list)
    closed: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    strays: int = 0
    error: str = ""
    busy_before: float = math.nan  # the machine's busy share in the second before the round


def step_seconds(rate: int, subscribers: int, longest: float) -> float:
    return min(longest, max(MIN_STEP_SECONDS, STEP_FRAMES / (rate * subscribers)))


def max_events(rates: list[int], subscribers: int, longest: float) -> int:
    steps = sum(math.ceil(rate * step_seconds(rate, subscribers, longest)) for rate in rates)
    return WARMUP_EVENTS + SINGLE_EVENTS + steps + 10


def client_argv(
    system: str, nodes: list[Node], subscribers: int, events: int, projects: Projects, cookies: Path
) -> list[str]:
    """The load client's arguments for `subscribers` sockets of `system`, `events` at most."""
    project = projects.of(system)
    path = {
        "ours": "/ws/realtime/",
        "ours on uvicorn": "/ws/realtime/",
        "plain Channels": f"/ws/items/{project.pk}/",
        "DCRF": DCRF_PATH,
    }.get(system, "/")
    argv = ["--ports", ",".join(str(node.port) for node in nodes), "--path", path]
    argv += ["--count", str(subscribers), "--cookies", str(cookies)]
    argv += ["--max-events", str(events)]
    if system in OURS:
        frame = {"op": "subscribe", "ref": "1", "stream": f"project:{project.pk}"}
        argv += ["--subscribe", json.dumps(frame)]
    elif system == "DCRF":
        frame = {"action": DCRF_ACTION, "request_id": "1", "project": project.pk}
        argv += ["--subscribe", json.dumps(frame), "--reply", DCRF_REPLY, "--ok", DCRF_OK]
    return argv


def one_event(client: LoadClient, save: Callable[[int], None], n: int) -> dict[str, Any]:
    """Save item `n` and wait until every subscriber has it (or SINGLE_TIMEOUT passed)."""
    save(n)
    return client.command(
        SINGLE_TIMEOUT + 10, cmd="wait", first=n, last=n, limit=SINGLE_TIMEOUT, quiet=QUIET
    )


def measure_round(
    system: str,
    nodes: list[Node],
    subscribers: int,
    rates: list[int],
    longest: float,
    save: Callable[[int], None],
    projects: Projects,
    env: dict[str, str],
    cookies: Path,
) -> Round:
    result = Round(system, subscribers)
    idle = CpuMeter({})
    time.sleep(1.0)
    result.busy_before = idle.read()["machine"]
    if result.busy_before > BUSY_WARNING:
        progress(f"{system}, {subscribers}: the machine is {result.busy_before:.0%} busy already")
    argv = client_argv(
        system, nodes, subscribers, max_events(rates, subscribers, longest), projects, cookies
    )
    with contextlib.ExitStack() as stack:
        client = LoadClient(argv, env, stack)
        ready = client.answer(timeout=60 + subscribers / 20)
        result.ready = ready["ready"]
        result.connect_seconds = ready["seconds"]
        result.failures = ready["failures"]
        progress(
            f"{system}, {subscribers}: {result.ready} subscribed in "
            f"{result.connect_seconds:.1f} s ({ready['failed']} failed {ready['failures']})"
        )
        if not result.ready:
            result.error = f"no subscriber connected: {ready['failures']}"
            return result
        pids: dict[str, int | None] = {"node a": nodes[0].process.pid}
        pids.update({"node b": nodes[1].process.pid, "client": client.process.pid})
        pids["writer"] = None  # this process
        number = 0

        for _ in range(WARMUP_EVENTS):
            one_event(client, save, number)
            number += 1
        meter = CpuMeter(pids)
        first, start = number, time.time()
        for _ in range(SINGLE_EVENTS):
            one_event(client, save, number)
            number += 1
            time.sleep(0.05)
        cpu = meter.read()
        phase = {"name": "single", "first": first, "last": number - 1, "start": start}
        result.single = client.command(120, cmd="report", phases=[phase])["phases"][0]
        result.single["cpu"] = cpu
        progress(
            f"{system}, {subscribers}: single events {summary(result.single)}; {cpu_text(cpu)}"
        )
        for index, rate in enumerate(rates):
            seconds = step_seconds(rate, subscribers, longest)
            count = math.ceil(rate * seconds)
            meter = CpuMeter(pids)
            began = time.time()
            wall = time.monotonic()
            for i in range(count):
                delay = wall + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                save(number + i)
            achieved = count / (time.monotonic() - wall)
            waited = client.command(
                STEP_TIMEOUT + 10,
                cmd="wait",
                first=number,
                last=number + count - 1,
                limit=STEP_TIMEOUT,
                quiet=QUIET,
            )
            cpu = meter.read()
            phase = {
                "name": f"{rate}/s",
                "first": number,
                "last": number + count - 1,
                "start": began,
            }
            number += count
            report = client.command(120, cmd="report", phases=[phase])["phases"][0]
            offered = achieved * result.ready
            saturated = (
                waited["outcome"] != "all" or report["delivered_per_s"] < SATURATED_BELOW * offered
            )
            step = {
                **report,
                "rate": rate,
                "seconds": seconds,
                "saves": count,
                "achieved": achieved,
                "offered_per_s": offered,
                "outcome": waited["outcome"],
                "saturated": saturated,
                "cpu": cpu,
            }
            result.steps.append(step)
            progress(
                f"{system}, {subscribers}, {rate}/s: {achieved:.0f} saves/s, {summary(report)}"
                f"{' SATURATED' if saturated else ''}; {cpu_text(cpu)}"
            )
            if saturated:
                result.skipped_rates = rates[index + 1 :]
                break
        status = client.command(30, cmd="status")
        result.closed = status["closed"]
        result.duplicates = status["duplicates"]
        result.strays = status["strays"]
        client.close()
    return result


def summary(report: dict[str, Any]) -> str:
    return (
        f"{report['received']:,}/{report['expected']:,} frames, p50 {ms(report['p50'])} "
        f"p99 {ms(report['p99'])} ms, last p99 {ms(report['last_p99'])} ms, "
        f"{report['delivered_per_s']:,.0f} frames/s, lost {report['lost']:,}"
    )


def ms(seconds: float) -> str:
    return (
        "-"
        if math.isnan(seconds)
        else f"{seconds * 1000:,.0f}"
        if seconds >= 0.1
        else f"{seconds * 1000:.1f}"
    )


def wait_connections_gone(timeout: float = 30.0) -> None:
    """Wait until the Connection rows of the closed sockets are deleted (ours only)."""
    from django.db import close_old_connections

    from realtime.models import Connection

    deadline = time.monotonic() + timeout
    while (left := Connection.objects.count()) and time.monotonic() < deadline:
        time.sleep(0.2)
    close_old_connections()
    if left:
        progress(f"{left} Connection rows still there after {timeout:.0f} s")


def run_system(
    system: str,
    counts: list[int],
    rates: list[int],
    longest: float,
    projects: Projects,
    env: dict[str, str],
    folder: Path,
    cookies: Path,
) -> list[Round]:
    from realtime.publisher import publisher

    rounds = []
    if system == "DCRF" and importlib.util.find_spec(DCRF_PACKAGE) is None:
        error = f"{DCRF_PACKAGE} is not installed (pip install -e '.[bench]')"
        progress(f"{system}: skipped, {error}")
        return [Round(system, subscribers, error=error) for subscribers in counts]
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        nodes = start_nodes(system, env, folder, stack)
        progress(
            f"{system}: 2 nodes on ports {nodes[0].port}, {nodes[1].port} "
            f"({time.monotonic() - started:.1f} s)"
        )
        with writer(system, projects, env["REDIS_URL"]) as save:
            for subscribers in counts:
                try:
                    rounds.append(
                        measure_round(
                            system, nodes, subscribers, rates, longest, save, projects, env, cookies
                        )
                    )
                except RuntimeError as exc:
                    tails = "\n".join(f"{node.name}:\n{node.tail(10)}" for node in nodes)
                    progress(f"{system}, {subscribers}: failed: {exc}\n{tails}")
                    rounds.append(Round(system, subscribers, error=str(exc)))
                else:
                    if rounds[-1].closed or rounds[-1].error:
                        trouble = rounds[-1].error or f"sockets closed: {rounds[-1].closed}"
                        tails = "\n".join(f"{node.name}:\n{node.tail(15)}" for node in nodes)
                        progress(
                            f"{system}, {subscribers}: {trouble}; the nodes' logs end\n{tails}"
                        )
                if system in OURS:
                    publisher.flush(timeout=30)
                    wait_connections_gone()
        for node in nodes:
            if node.process.poll() is not None:
                progress(f"{system} {node.name} exited early:\n{node.tail()}")
    return rounds


# -- one event, interleaved: the systems of the latency target taking turns ----------------


@dataclass
class Interleaved:
    """One event at a time to `subscribers`, `systems` taking turns in blocks."""

    subscribers: int
    systems: tuple[str, ...]
    blocks: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # system -> report
    pooled: dict[str, dict[str, Any]] = field(default_factory=dict)  # all blocks of a system
    error: str = ""


def block_order(systems: tuple[str, ...], block: int) -> tuple[str, ...]:
    """The order of block `block`: rotated by one each block, reversed every other round.

    Over 2 x len(systems) blocks each system takes each place twice (for three, that is all
    six orders).
    """
    turn = block % len(systems)
    order = systems[turn:] + systems[:turn]
    return order[::-1] if (block // len(systems)) % 2 else order


def run_interleaved(
    systems: tuple[str, ...],
    counts: list[int],
    blocks: int,
    per_block: int,
    projects: Projects,
    env: dict[str, str],
    folder: Path,
    cookies: Path,
) -> list[Interleaved]:
    """All systems' nodes and subscribers up at once; per count, blocks taking turns.

    The sequential rounds give each system minutes of its own, so a slow spell on this shared
    machine lands on one system only. Here each block of `per_block` single events goes to
    one system, then the same to the next, in an order that changes every block, so slow
    spells fall on all of them; the sockets of the systems waiting their turn stay connected
    and idle.
    """
    from realtime.publisher import publisher

    out = []
    with contextlib.ExitStack() as stack:
        nodes = {system: start_nodes(system, env, folder, stack) for system in systems}
        for subscribers in counts:
            try:
                out.append(
                    interleaved_round(nodes, subscribers, blocks, per_block, projects, env, cookies)
                )
            except RuntimeError as exc:
                tails = "\n".join(
                    f"{system} {node.name}:\n{node.tail(10)}"
                    for system, pair in nodes.items()
                    for node in pair
                )
                progress(f"interleaved, {subscribers}: failed: {exc}\n{tails}")
                out.append(Interleaved(subscribers, systems, error=str(exc)))
            publisher.flush(timeout=30)
            wait_connections_gone()
    return out


def interleaved_round(
    nodes: dict[str, list[Node]],
    subscribers: int,
    blocks: int,
    per_block: int,
    projects: Projects,
    env: dict[str, str],
    cookies: Path,
) -> Interleaved:
    systems = tuple(nodes)
    result = Interleaved(subscribers, systems)
    events = WARMUP_EVENTS + blocks * per_block + 10
    with contextlib.ExitStack() as stack:
        clients = {}
        for system in systems:
            argv = client_argv(system, nodes[system], subscribers, events, projects, cookies)
            client = LoadClient(argv, env, stack)
            ready = client.answer(timeout=60 + subscribers / 20)
            if ready["ready"] != subscribers:
                raise RuntimeError(
                    f"{system}: {ready['ready']} of {subscribers} subscribed ({ready['failures']})"
                )
            clients[system] = client
        progress(f"interleaved, {subscribers}: all systems subscribed")
        numbers = dict.fromkeys(systems, 0)

        def singles(system: str, count: int) -> dict[str, Any]:
            """Save `count` items one at a time, each once all got the previous; the phase."""
            first, start = numbers[system], time.time()
            with writer(system, projects, env["REDIS_URL"]) as save:
                for _ in range(count):
                    one_event(clients[system], save, numbers[system])
                    numbers[system] += 1
                    time.sleep(0.05)
            last = numbers[system] - 1
            return {"name": "one event", "first": first, "last": last, "start": start}

        for system in systems:
            singles(system, WARMUP_EVENTS)
        phases: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
        for block in range(blocks):
            row = {}
            for system in block_order(systems, block):
                phase = singles(system, per_block)
                phases[system].append(phase)
                report = clients[system].command(120, cmd="report", phases=[phase])
                row[system] = report["phases"][0]
            result.blocks.append(row)
            progress(
                f"interleaved, {subscribers}, block {block + 1}/{blocks}: "
                + "; ".join(
                    f"{system} p99 {ms(row[system]['p99'])} ms, last p99 "
                    f"{ms(row[system]['last_p99'])} ms"
                    for system in systems
                )
            )
        for system in systems:
            whole = {**phases[system][0], "last": phases[system][-1]["last"]}
            report = clients[system].command(120, cmd="report", phases=[whole])
            result.pooled[system] = report["phases"][0]
        for client in clients.values():
            client.close()
    return result


def block_ratios(run: Interleaved, key: str, system: str = "ours") -> list[float]:
    """`system` / the ceiling, of `key` ("p99" or "last_p99"), in each block."""
    return [row[system][key] / row["ceiling"][key] for row in run.blocks]


# -- tables and verdicts -----------------------------------------------------------------


def step_cell(round_: Round, rate: int) -> str:
    for step in round_.steps:
        if step["rate"] == rate:
            text = f"{step['delivered_per_s']:,.0f} ({ms(step['p50'])}/{ms(step['p99'])} ms)"
            return text + (" sat." if step["saturated"] else "")
    return "sat. below" if rate in round_.skipped_rates else "-"


def phases_of(round_: Round) -> list[tuple[str, dict[str, Any]]]:
    """(name, report) of each measured phase of a round: the single events, then the steps."""
    single = [("one event", round_.single)] if round_.single else []
    return [*single, *((f"{step['rate']:,}/s", step) for step in round_.steps)]


def disturbed(round_: Round, report: dict[str, Any]) -> bool:
    """Whether other programs were busy during this phase (so its figures are low)."""
    rest = report.get("cpu", {}).get("rest", 0.0)
    return round_.busy_before > BUSY_WARNING or rest > REST_WARNING


def lost_cell(round_: Round) -> str:
    parts = []
    for name, report in phases_of(round_):
        if report["lost"]:
            late = report.get("outcome") == "timeout"
            parts.append(
                f"{report['lost']:,} at {name}"
                + (f" (not in after {STEP_TIMEOUT:.0f} s, still arriving)" if late else "")
            )
    return ", ".join(parts) or "0"


def tables(rounds: list[Round], rates: list[int]) -> list[dict[str, Any]]:
    out = []
    counts = sorted({r.subscribers for r in rounds})
    for subscribers in counts:
        rows = []
        detail = []
        for round_ in (r for r in rounds if r.subscribers == subscribers):
            if round_.error:
                rows.append(
                    [round_.system, f"failed: {round_.error[:80]}"] + ["-"] * (5 + len(rates))
                )
                continue
            single = round_.single or {}
            rows.append(
                [
                    round_.system,
                    f"{round_.ready:,}",
                    ms(single.get("p50", math.nan)),
                    ms(single.get("p99", math.nan)),
                    ms(single.get("last_p50", math.nan)),
                    ms(single.get("last_p99", math.nan)),
                    *(step_cell(round_, rate) for rate in rates),
                    lost_cell(round_),
                ]
            )
            if single:
                detail.append(
                    [
                        round_.system,
                        f"one event x{single['events']}",
                        f"{single['span']:.1f}",
                        "-",
                        "-",
                        "-",
                        ms(single["p50"]),
                        ms(single["p99"]),
                        ms(single["max"]),
                        f"{single['lost']:,}",
                        "-",
                        " / ".join(f"{single['cpu'][k]:.0%}" for k in CPU_COLUMNS),
                    ]
                )
            for step in round_.steps:
                detail.append(
                    [
                        round_.system,
                        f"{step['rate']:,}/s",
                        f"{step['seconds']:.1f}",
                        f"{step['achieved']:,.0f}",
                        f"{step['offered_per_s']:,.0f}",
                        f"{step['delivered_per_s']:,.0f}",
                        ms(step["p50"]),
                        ms(step["p99"]),
                        ms(step["max"]),
                        f"{step['lost']:,}",
                        ("yes" if step["saturated"] else "no")
                        + ("" if step["outcome"] == "all" else f" ({step['outcome']})"),
                        " / ".join(f"{step['cpu'][k]:.0%}" for k in CPU_COLUMNS),
                    ]
                )
        out.append(
            {
                "title": f"{subscribers:,} subscribers",
                "columns": [
                    "system",
                    "subscribed",
                    "one event p50 ms",
                    "p99 ms",
                    "last subscriber p50 ms",
                    "p99 ms",
                    *(f"{rate:,} saves/s: events/s (p50/p99 ms)" for rate in rates),
                    "events lost",
                ],
                "rows": rows,
                "text_columns": 1,
            }
        )
        out.append(
            {
                "title": f"{subscribers:,} subscribers: phases",
                "columns": [
                    "system",
                    "phase",
                    "s",
                    "saves/s",
                    "offered events/s",
                    "delivered events/s",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "lost",
                    "saturated",
                    f"CPU % of one processor: {' / '.join(CPU_COLUMNS[:-1])}; machine % of "
                    f"all {PROCESSORS}",
                ],
                "rows": detail,
                "text_columns": 2,
            }
        )
    return out


def interleaved_table(runs: list[Interleaved]) -> dict[str, Any]:
    systems = runs[0].systems
    others = [system for system in systems if system != "ceiling"]
    rows = []
    for run in runs:
        if run.error:
            failed = [f"{run.subscribers:,}", f"failed: {run.error[:80]}"]
            rows.append(failed + ["-"] * (2 * len(systems) + 1))
            continue
        labels = [f"{run.subscribers:,}"] + [""] * len(run.blocks)
        names = [
            *(f"{n + 1} ({', '.join(block_order(systems, n))})" for n in range(len(run.blocks))),
            "all blocks",
        ]
        for label, name, row in zip(labels, names, [*run.blocks, run.pooled], strict=True):
            ceiling = row["ceiling"]
            rows.append(
                [
                    label,
                    name,
                    *(ms(row[system]["p99"]) for system in systems),
                    *(f"{row[system]['p99'] / ceiling['p99']:.2f}x" for system in others),
                    ms(row["ours"]["last_p99"]),
                    ms(ceiling["last_p99"]),
                    f"{row['ours']['last_p99'] / ceiling['last_p99']:.2f}x",
                    " / ".join(f"{row[system]['lost']:,}" for system in systems),
                ]
            )
    return {
        "title": f"One event, interleaved: {', '.join(systems)} taking turns",
        "columns": [
            "subscribers",
            "block (order)",
            *(f"{system} p99 ms" for system in systems),
            *(f"{system} / ceiling" for system in others),
            "ours last subscriber p99 ms",
            "ceiling last subscriber p99 ms",
            "ours / ceiling",
            f"lost ({' / '.join(systems)})",
        ],
        "rows": rows,
        "text_columns": 2,
    }


def find(rounds: list[Round], system: str, subscribers: int) -> Round | None:
    for round_ in rounds:
        if round_.system == system and round_.subscribers == subscribers and not round_.error:
            return round_
    return None


def sustained(round_: Round) -> float:
    return max((step["delivered_per_s"] for step in round_.steps), default=math.nan)


def sustained_step(round_: Round) -> dict[str, Any] | None:
    return max(round_.steps, key=lambda step: step["delivered_per_s"], default=None)


def caveat(*measured: tuple[Round, dict[str, Any] | None]) -> str:
    """A warning for a verdict whose figures were taken while other programs were busy."""
    hit = [
        f"{r.system}, {r.subscribers:,}"
        for r, report in measured
        if report and disturbed(r, report)
    ]
    return f"; measured while other programs were busy ({'; '.join(hit)}): see notes" if hit else ""


def spread(ratios: list[float]) -> str:
    return (
        f"median {statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f}x over "
        f"{len(ratios)} blocks"
    )


def verdicts(rounds: list[Round], runs: list[Interleaved]) -> list[str]:
    out = []
    ours, plain = find(rounds, "ours", 1000), find(rounds, "plain Channels", 1000)
    if ours and plain:
        a, b = sustained(ours), sustained(plain)
        ratio = a / b
        out.append(
            f"{'PASS' if ratio >= TARGET_THROUGHPUT_X else 'MISS'} (1) sustained delivery at "
            f"1,000 subscribers: ours {a:,.0f} events/s vs plain Channels {b:,.0f} = {ratio:.1f}x "
            f"(target at least {TARGET_THROUGHPUT_X:.0f}x)"
            + caveat((ours, sustained_step(ours)), (plain, sustained_step(plain)))
        )
    else:
        out.append("NOT MEASURED (1) sustained delivery at 1,000 subscribers (no 1,000 round)")
    for subscribers in (1000, 5000):
        run = next((r for r in runs if r.subscribers == subscribers and not r.error), None)
        if run:
            mine, theirs = run.pooled["ours"], run.pooled["ceiling"]
            p99, last = mine["p99"] / theirs["p99"], mine["last_p99"] / theirs["last_p99"]
            passed = p99 <= TARGET_LATENCY_X and last <= TARGET_LATENCY_X
            each = mine["events"] // len(run.blocks)
            out.append(
                f"{'PASS' if passed else 'MISS'} (2) one event to {subscribers:,} subscribers, "
                f"{len(run.blocks)} interleaved blocks of {each} events: p99 ours "
                f"{ms(mine['p99'])} ms vs ceiling {ms(theirs['p99'])} ms = {p99:.2f}x "
                f"({spread(block_ratios(run, 'p99'))}); last subscriber p99 ours "
                f"{ms(mine['last_p99'])} ms vs ceiling {ms(theirs['last_p99'])} ms = {last:.2f}x "
                f"({spread(block_ratios(run, 'last_p99'))}) (target at most "
                f"{TARGET_LATENCY_X}x on both, over all blocks)"
                + "".join(
                    f"; diagnostic, {system}: p99 {ms(run.pooled[system]['p99'])} ms = "
                    f"{run.pooled[system]['p99'] / theirs['p99']:.2f}x the ceiling "
                    f"({spread(block_ratios(run, 'p99', system))})"
                    for system in run.systems
                    if system not in ("ours", "ceiling")
                )
            )
            continue
        ours, ceiling = find(rounds, "ours", subscribers), find(rounds, "ceiling", subscribers)
        if not (ours and ceiling and ours.single and ceiling.single):
            out.append(f"NOT MEASURED (2) one event to {subscribers:,} subscribers")
            continue
        p99 = ours.single["p99"] / ceiling.single["p99"]
        last = ours.single["last_p99"] / ceiling.single["last_p99"]
        passed = p99 <= TARGET_LATENCY_X and last <= TARGET_LATENCY_X
        out.append(
            f"{'PASS' if passed else 'MISS'} (2) one event to {subscribers:,} subscribers: p99 "
            f"ours {ms(ours.single['p99'])} ms vs ceiling {ms(ceiling.single['p99'])} ms = "
            f"{p99:.2f}x; last subscriber p99 ours {ms(ours.single['last_p99'])} ms vs ceiling "
            f"{ms(ceiling.single['last_p99'])} ms = {last:.2f}x (target at most "
            f"{TARGET_LATENCY_X}x on both)" + caveat((ours, ours.single), (ceiling, ceiling.single))
        )
    lost = []
    phases = 0
    for round_ in (r for r in rounds if r.system == "ours" and not r.error):
        for name, report in phases_of(round_):
            if report.get("saturated"):
                continue
            phases += 1
            if report["lost"]:
                lost.append(f"{report['lost']:,} at {round_.subscribers:,} subscribers, {name}")
    for run in (r for r in runs if not r.error):
        phases += 1
        if run.pooled["ours"]["lost"]:
            lost.append(
                f"{run.pooled['ours']['lost']:,} at {run.subscribers:,} subscribers, "
                "interleaved one event"
            )
    out.append(
        f"{'MISS' if lost or not phases else 'PASS'} (3) zero loss below saturation: ours lost "
        f"{', '.join(lost) if lost else 'nothing'} in {phases} unsaturated phases (single events "
        "and rate steps delivered at 90% or more of the offered rate)"
    )
    return out


# -- main --------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, database_url: str, redis_url: str, notes: list[str]
) -> dict[str, Any]:
    setup_django(database_url, redis_url)
    from django.db import connection, connections

    from realtime.publisher import close_ack_connections

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "PYTHONPATH": os.pathsep.join(
            [str(BENCH), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    rounds: list[Round] = []
    runs: list[Interleaved] = []
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        folder = Path(tmp)
        cookies = folder / "sessions.txt"
        projects = make_fixtures(max(args.subscribers), cookies)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            postgres = cursor.fetchone()[0]
        try:
            for system in [] if args.interleaved_only else args.systems:
                rounds += run_system(
                    system,
                    args.subscribers,
                    args.rates,
                    args.step_seconds,
                    projects,
                    env,
                    folder,
                    cookies,
                )
            counts = [n for n in args.interleaved if n <= max(args.subscribers)]
            if args.blocks and counts and {"ours", "ceiling"} <= set(args.systems):
                runs = run_interleaved(
                    INTERLEAVED,
                    counts,
                    args.blocks,
                    args.block_events,
                    projects,
                    env,
                    folder,
                    cookies,
                )
        finally:
            close_ack_connections()
            connections.close_all()
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    redis_version = client.info("server")["redis_version"]
    client.close()
    busy = [
        f"{r.system}, {r.subscribers:,} ({r.busy_before:.0%})"
        for r in rounds
        if r.busy_before > BUSY_WARNING
    ]
    if busy:
        notes.append(
            "Other programs were running before these rounds (share of the machine busy in the "
            f"second before, with our servers idle): {'; '.join(busy)}. Their figures are low."
        )
    crowded = [
        f"{r.system}, {r.subscribers:,}, {name} ({report['cpu']['rest']:.0%})"
        for r in rounds
        for name, report in phases_of(r)
        if report.get("cpu", {}).get("rest", 0.0) > REST_WARNING
    ]
    if crowded:
        notes.append(
            "The rest of the machine (Redis, PostgreSQL and other programs) used more than "
            f"{REST_WARNING:.0%} of a processor in: {'; '.join(crowded)}. Redis and PostgreSQL "
            "alone stay well under that here, so other programs were competing; those phases "
            "are slower than this machine allows."
        )
    notes += [
        f"Measured in {time.monotonic() - started:.0f} s on PostgreSQL {postgres} "
        f"(database `{DATABASE}`, created and dropped) and Redis {redis_version}; all traffic "
        "on 127.0.0.1; the load client, the writer, both nodes, Redis and PostgreSQL share this "
        "machine's processors.",
    ]
    return {
        "title": f"{', '.join(f'{n:,}' for n in args.subscribers)} subscribers, 2 nodes per system",
        "tables": tables(rounds, args.rates) + ([interleaved_table(runs)] if runs else []),
        "verdicts": verdicts(rounds, runs),
        "notes": notes,
        "rounds": [r.__dict__ for r in rounds],
        "interleaved": [r.__dict__ for r in runs],
    }


ABOUT = [
    "**ours**: two daphne nodes serving `config.asgi:application` (`/ws/realtime/`) with the "
    "pub/sub channel layer (`RedisPubSubChannelLayer`, `socket_timeout=None`); every subscriber "
    "sends `subscribe` for `project:<pk>`; the writer's `Item.save()` logs the event and the "
    "background publisher sends it to the stream's group, once per node",
    "**plain Channels**: two daphne nodes serving bench/fanout_plain.py, an "
    "`AsyncWebsocketConsumer` that joins the group `items-<pk>` of a `RedisChannelLayer` "
    "(defaults, `socket_timeout=None`) on connect; a `post_save` handler calls "
    "`async_to_sync(group_send)` with the item's serializer data per save and each consumer "
    "`json.dumps` and sends it",
    f"**DCRF**: two daphne nodes serving bench/fanout_dcrf.py, django-channels-rest-framework "
    f"{package_version(DCRF_PACKAGE)} used as its documentation shows for changes of a model "
    "filtered by a parent: a `GenericAsyncAPIConsumer` with "
    "`@model_observer(Item, serializer_class=ItemSerializer)` grouped by project "
    "(`groups_for_signal`/`groups_for_consumer`); every subscriber sends the "
    f"`{DCRF_ACTION}` action, which checks `board.view_project` on the project (guardian) and "
    "subscribes. DCRF sends with the default layer, here the plain-Channels "
    "`RedisChannelLayer` (bench/fanout_dcrf_settings.py); its `post_save` receiver (connected "
    "in the writer for this system only, pipeline off) serializes the item once and calls "
    "`async_to_sync(group_send)` on commit; each consumer deep-copies the message and "
    "`reply()`s it as JSON",
    "**ceiling**: two bare `websockets` servers (bench/fanout_ceiling.py, no Django), each "
    "subscribed to a Redis pub/sub channel; the writer saves the item (pipeline off) and "
    "publishes one pre-encoded frame, which each server hands to all its sockets with "
    "`websockets.broadcast`",
    "Diagnostics, in the round tables only when a run names them in `--systems`, and always "
    "in the interleaved blocks: **ours on uvicorn** (the same application and settings "
    "served by uvicorn with its sans-I/O "
    "`websockets` implementation, `--ws websockets-sansio`, instead of daphne) and "
    "**daphne floor** (bench/fanout_daphne_floor.py: a raw ASGI app on daphne, no Django or "
    "Channels, handing the ceiling's pre-encoded frame to each socket in turn), which split "
    "the gap between ours and the ceiling into the server's part and ours",
    "Settings (bench/fanout_settings.py; DCRF's nodes bench/fanout_dcrf_settings.py, the same "
    "with the `RedisChannelLayer` as default): config.settings with DEBUG off, `CONN_MAX_AGE=300`, "
    "`MAX_CONNECTIONS_PER_USER=100` and a channel-layer prefix of the run's own (Redis pub/sub "
    "channels are server-wide, and tests share the server). Subscribers are split evenly over "
    "the two nodes of each system and live in one load client process "
    "(bench/fanout_client.py: `websockets` Sans-I/O protocol on asyncio, no compression, its "
    "garbage collector off once connected so its own pauses count against no system); 20 "
    "subscribers share a user and its session cookie; every socket answers pings. The writer "
    "(this process, Django ORM) titles each item `bench <n> <time.time()>` right before "
    "`save()`; latency is the client's `time.time()` when the frame's bytes arrive minus that "
    "time.",
    "**one event, interleaved** (after the rounds, for 1,000 and 5,000 subscribers): ours, "
    "ours on uvicorn, the daphne floor and the ceiling, each with its two nodes and its own "
    "load client, all connected at once; then blocks of one-at-a-time saves, each block going "
    "to the four in another order (eight blocks: each system takes each place twice), so that "
    "a slow spell of this shared machine falls on all of them rather than on one system's "
    "round. The latency verdict is the p99 over all blocks (pooled); the ratio of each block "
    "is shown beside it, to show how far it moves",
    f"**one event**: {SINGLE_EVENTS} saves one at a time (after {WARMUP_EVENTS} unmeasured), "
    "each once every subscriber has the previous one; p50/p99 over all deliveries, and over "
    "the time the last subscriber got each event. **rate steps**: saves paced at the rate for "
    f"{STEP_SECONDS:.0f} s (shorter when that would offer more than {STEP_FRAMES:,} frames, "
    f"never under {MIN_STEP_SECONDS:.0f} s); delivered events/s = frames received of the "
    "step's events / (last arrival - first save); a step is saturated when that is under 90% "
    "of the offered rate (saves/s achieved x subscribers) or not everything arrived; higher "
    "steps are then skipped (`sat. below`). An event a subscriber has not received once "
    f"nothing arrived for {QUIET:.0f} s (or {STEP_TIMEOUT:.0f} s passed) is lost. CPU is "
    "per phase, from /proc: `rest` is the machine's busy time not spent in our four "
    "processes (Redis, PostgreSQL, anything else running).",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    numbers = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--subscribers", type=numbers, default=list(DEFAULT_SUBSCRIBERS))
    parser.add_argument("--rates", type=numbers, default=list(DEFAULT_RATES))
    parser.add_argument("--step-seconds", type=float, default=STEP_SECONDS)
    parser.add_argument("--systems", type=lambda t: t.split(","), default=list(SYSTEMS))
    parser.add_argument(
        "--interleaved",
        type=numbers,
        default=[1000, 5000],
        help="subscriber counts of the interleaved one-event blocks (when ours and the ceiling "
        "are among --systems; counts above the largest of --subscribers are dropped)",
    )
    parser.add_argument(
        "--blocks", type=int, default=INTERLEAVED_BLOCKS, help="interleaved blocks; 0: none"
    )
    parser.add_argument("--block-events", type=int, default=INTERLEAVED_EVENTS)
    parser.add_argument(
        "--interleaved-only", action="store_true", help="skip the rounds one system at a time"
    )
    args = parser.parse_args()
    unknown = set(args.systems) - set(SYSTEMS) - set(DIAGNOSTICS)
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {SYSTEMS + DIAGNOSTICS}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    report: dict[str, Any] = {"benchmark": BENCHMARK, "about": ABOUT}
    notes: list[str] = []
    try:
        redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        redis_answers(redis_url)
        server_url = os.environ.get("DATABASE_URL", "")
        if not server_url.startswith(("postgres://", "postgresql://")):
            server_url = DEFAULT_POSTGRES_URL
        server = urlsplit(server_url)
        progress(f"PostgreSQL {server.hostname}:{server.port or 5432}, Redis {redact(redis_url)}")
        with postgres_database(server_url, DATABASE) as database_url:
            report.update(measure(args, database_url, redis_url, notes))
    except Unavailable as exc:
        progress(f"skipped: {exc}")
        report.update(title="PostgreSQL and Redis", skipped=str(exc))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
