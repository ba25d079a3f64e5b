"""Writer of the SSE benchmark: saves Items of one project at a steady rate, step by step.

`--system ours` runs with config.settings (our pipeline logs the event in the save's
transaction and publishes it after commit through Redis); `--system eventstream` runs with
bench/sse_eventstream_settings.py (pipeline off) and follows each plain save with
django-eventstream's `send_event` of the item's serializer data. Either way the title is
`bench <n> <time.time()>`, read just before the save, so latency covers save, commit, publish
and delivery. Commands are JSON lines on stdin (`{"rate": r, "seconds": s}` or
`{"cmd": "quit"}`); each step's answer is a JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any


def answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def saver(system: str, project_pk: int) -> tuple[Callable[[str], None], Callable[[], None]]:
    """Return (save one item with this title, wait until everything saved is published)."""
    from board.models import Item

    if system == "ours":
        from realtime.publisher import publisher

        def save(title: str) -> None:
            Item.objects.create(project_id=project_pk, title=title)

        def flush() -> None:
            publisher.flush(timeout=30)

        return save, flush

    from django_eventstream import send_event
    from sse_eventstream_app import channel_of

    from board.serializers import ItemSerializer

    channel = channel_of(project_pk)

    def save_and_send(title: str) -> None:
        item = Item.objects.create(project_id=project_pk, title=title)
        send_event(channel, "message", ItemSerializer(item).data)

    return save_and_send, lambda: None


def step(save: Callable[[str], None], first: int, rate: float, seconds: float) -> dict[str, Any]:
    """Save round(rate * seconds) items on a fixed schedule; report what was achieved."""
    count = max(1, round(rate * seconds))
    start = time.time()
    behind = 0.0
    last_start = start
    for i in range(count):
        due = start + i / rate
        now = time.time()
        if due > now:
            time.sleep(due - now)
        else:
            behind = max(behind, now - due)
        last_start = time.time()
        save(f"bench {first + i} {last_start:.6f}")
    end = time.time()
    return {
        "rate": rate,
        "first": first,
        "last": first + count - 1,
        "start": start,
        "end": end,
        # The rate at which saves started (the schedule's, if the writer kept up).
        "achieved": (count - 1) / max(last_start - start, 1e-9) if count > 1 else rate,
        "max_behind_s": behind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["ours", "eventstream"], required=True)
    parser.add_argument("--project", type=int, required=True)
    args = parser.parse_args()
    import django

    django.setup()
    save, flush = saver(args.system, args.project)
    save("warm-up")  # connections, imports, the stream row
    flush()
    answer({"ready": True})
    number = 1
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("cmd") == "quit":
            break
        result = step(save, number, float(command["rate"]), float(command["seconds"]))
        flush()
        result["flushed"] = time.time()
        number = result["last"] + 1
        answer(result)


if __name__ == "__main__":
    main()
