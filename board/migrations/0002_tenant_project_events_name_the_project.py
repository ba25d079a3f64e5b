"""Project events already in the log on `tenant:` streams carried the whole project (name,
owner) to every member of the organization; rewrite them to what the stream now carries:
`{"id", "organization"}` (decisions #40). Deletes already carried `{"id"}` only."""

from __future__ import annotations

from django.db import migrations

_KEPT = ("id", "organization")


def _redacted(data):
    if not isinstance(data, dict):
        return data
    return {key: data[key] for key in _KEPT if key in data}


def redact_tenant_project_events(apps, schema_editor):
    Event = apps.get_model("realtime", "Event")
    events = Event.objects.using(schema_editor.connection.alias)
    rows = events.filter(
        stream__name__startswith="tenant:", type__regex=r"^v[0-9]+:project\.(created|updated)$"
    )
    batch = []
    for event in rows.only("pk", "data", "variants").iterator(chunk_size=500):
        data = _redacted(event.data)
        variants = {
            version: {**variant, "data": _redacted(variant.get("data"))}
            for version, variant in (event.variants or {}).items()
        }
        if data != event.data or variants != (event.variants or {}):
            event.data, event.variants = data, variants
            batch.append(event)
        if len(batch) >= 500:
            events.bulk_update(batch, ["data", "variants"])
            batch = []
    if batch:
        events.bulk_update(batch, ["data", "variants"])


class Migration(migrations.Migration):
    dependencies = [
        ("board", "0001_initial"),
        ("realtime", "0004_event_json_refuses_nan"),
    ]

    operations = [
        migrations.RunPython(redact_tenant_project_events, migrations.RunPython.noop),
    ]
