import pytest
from django.core.exceptions import ImproperlyConfigured

from realtime.conf import DEFAULTS, realtime_settings


def test_defaults_apply_when_unset(settings):
    settings.REALTIME = {}
    assert DEFAULTS["RELAY_BATCH"] == realtime_settings.RELAY_BATCH


def test_settings_reload_on_change(settings):
    settings.REALTIME = {"RELAY_BATCH": 3}
    assert realtime_settings.RELAY_BATCH == 3
    settings.REALTIME = {"RELAY_BATCH": 4}
    assert realtime_settings.RELAY_BATCH == 4


def test_unknown_key_is_an_error(settings):
    settings.REALTIME = {"RELAY_BATCHES": 3}
    with pytest.raises(ImproperlyConfigured, match="RELAY_BATCHES"):
        getattr(realtime_settings, "RELAY_BATCH")  # noqa: B009


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        getattr(realtime_settings, "NOPE")  # noqa: B009


@pytest.mark.parametrize("value", [[("RELAY_BATCH", 3)], "RELAY_BATCH", 3])
def test_a_setting_that_is_not_a_dict_is_an_error(settings, value):
    settings.REALTIME = value
    with pytest.raises(ImproperlyConfigured, match="REALTIME must be a dict"):
        getattr(realtime_settings, "RELAY_BATCH")  # noqa: B009


def test_a_key_that_is_not_a_string_is_named_in_the_error(settings):
    settings.REALTIME = {1: 2, "RELAY_BATCHES": 3}
    with pytest.raises(ImproperlyConfigured, match=r"'RELAY_BATCHES', 1\."):
        getattr(realtime_settings, "RELAY_BATCH")  # noqa: B009


def test_a_non_dict_setting_is_reported_by_the_checks(settings):
    from realtime.checks import check_settings

    settings.REALTIME = [("RELAY_BATCH", 3)]
    [error] = check_settings()
    assert error.id == "realtime.E010"


def test_every_setting_and_check_is_documented():
    """The settings table of docs/integration.md has a row for every REALTIME key, and the
    docs name every check id the apps can report (in full, or as `E041` beside its app)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "integration.md").read_text()
    assert [key for key in DEFAULTS if f"| `{key}` |" not in table] == []
    docs = "".join(path.read_text() for path in (root / "docs").glob("*.md"))
    ids = set()
    for checks in ("realtime/checks.py", "presence/checks.py"):
        ids |= set(re.findall(r'id="(\w+\.[EW]\d{3})"', (root / checks).read_text()))
    assert len(ids) > 30  # the pattern found them
    missing = [i for i in sorted(ids) if i not in docs and f"`{i.split('.')[1]}`" not in docs]
    assert missing == []
