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
