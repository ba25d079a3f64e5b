"""Bad registrations are reported by system checks at startup."""

from __future__ import annotations

import pytest
from django.core import checks
from django.db import models
from django.test import override_settings

from board.models import Item, Project
from realtime.checks import check_registrations, check_settings
from realtime.registry import Registry, registry


@pytest.fixture
def isolated_registry(monkeypatch):
    fresh = Registry()
    monkeypatch.setattr("realtime.checks.registry", fresh)
    return fresh


def messages(errors):
    return [e.msg for e in errors]


def test_the_demo_registrations_pass():
    assert check_registrations() == []
    assert {r.model for r in registry.all()} >= {Item, Project}


def test_not_a_model_is_reported(isolated_registry):
    isolated_registry.register(object, streams="x:{pk}")
    [error] = check_registrations()
    assert error.id == "realtime.E001"
    assert "needs a model class" in error.msg


def test_stream_template_making_an_invalid_name_is_reported(isolated_registry):
    isolated_registry.register(Item, streams="Project {project_id}", version="v1")
    [error] = check_registrations()
    assert error.id == "realtime.E003"
    assert "invalid stream name" in error.msg


def test_stream_callable_returning_an_invalid_name_is_reported(isolated_registry):
    isolated_registry.register(Item, streams=lambda item: f"project/{item.project_id}")
    [error] = check_registrations()
    assert error.id == "realtime.E003"
    assert "'project/1'" in error.msg


def test_stream_callable_returning_a_non_string_is_reported(isolated_registry):
    isolated_registry.register(Item, streams=lambda item: [item.project_id])
    [error] = check_registrations()
    assert "must be a string" in error.msg


def test_stream_callable_that_raises_is_reported(isolated_registry):
    isolated_registry.register(Item, streams=lambda item: item.no_such_attribute)
    [error] = check_registrations()
    assert "AttributeError" in error.msg


def test_stream_callable_that_reads_related_rows_is_not_guessed_at(isolated_registry):
    # It would need the database; only a real save can tell, so no false error.
    isolated_registry.register(Item, streams=lambda item: f"tenant:{item.project.organization_id}")
    assert check_registrations() == []


def test_unknown_serializer_path_is_reported(isolated_registry):
    isolated_registry.register(Item, streams="project:{project_id}", serializer="board.nope.Ser")
    [error] = check_registrations()
    assert error.id == "realtime.E002"
    assert "cannot be imported" in error.msg


def test_serializer_that_is_not_callable_is_reported(isolated_registry):
    isolated_registry.register(Item, streams="project:{project_id}", serializer=42)
    [error] = check_registrations()
    assert "serializer must be" in error.msg


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"version": "1"}, "version must look like"),
        ({"actions": ["created", "moved"]}, "actions must be"),
        ({"name": "Item Thing"}, "does not make a valid event type"),
        ({"streams": []}, "no streams given"),
        ({"streams": [42]}, "template string or a callable"),
    ],
)
def test_bad_options_are_reported(isolated_registry, options, fragment):
    isolated_registry.register(Item, **{"streams": "project:{project_id}", **options})
    assert any(fragment in m for m in messages(check_registrations()))


def test_duplicate_version_is_reported(isolated_registry):
    isolated_registry.register(Item, streams="project:{project_id}")
    isolated_registry.register(Item, streams="project:{project_id}")
    assert any("registered twice" in m for m in messages(check_registrations()))


def test_abstract_model_is_reported(isolated_registry):
    class Base(models.Model):
        class Meta:
            abstract = True
            app_label = "board"

    isolated_registry.register(Base, streams="x:1")
    assert any("abstract" in m for m in messages(check_registrations()))


def test_missing_channel_layer_is_reported(settings):
    settings.REALTIME = {"CHANNEL_LAYER": "events"}
    [error] = check_settings()
    assert error.id == "realtime.E011"


def test_unknown_setting_is_reported(settings):
    settings.REALTIME = {"CHANEL_LAYER": "default"}
    [error] = check_settings()
    assert error.id == "realtime.E010"
    assert "CHANEL_LAYER" in error.msg


def test_checks_run_through_django(isolated_registry):
    isolated_registry.register(Item, streams="bad name")
    errors = checks.run_checks(tags=["realtime"])
    assert any(e.id == "realtime.E003" for e in errors)


def test_version_field_typo_is_reported(isolated_registry):
    isolated_registry.register(Item, streams="project:{project_id}", version_field="revision")
    assert any("version_field 'revision'" in m for m in messages(check_registrations()))


@pytest.mark.parametrize("prefix", ["", "has space", "a.b", "x" * 21])
def test_bad_group_prefix_is_reported(settings, prefix):
    settings.REALTIME = {"GROUP_PREFIX": prefix}
    [error] = check_settings()
    assert error.id == "realtime.E012"


@pytest.mark.parametrize(
    ("policies", "fragment"),
    [({"x": "board.nope.Policy"}, "No module"), ({"x": "board.models.Item"}, "not a StreamPolicy")],
)
def test_bad_stream_policy_paths_are_reported(settings, policies, fragment):
    settings.REALTIME = {"STREAM_POLICIES": policies}
    [error] = check_settings()
    assert error.id == "realtime.E013"
    assert fragment in error.msg


def test_sweep_must_outlast_two_heartbeats(settings):
    settings.REALTIME = {"HEARTBEAT": 30, "CONNECTION_SWEEP_AFTER": 60}
    [error] = check_settings()
    assert error.id == "realtime.E014"


@pytest.mark.parametrize("thresholds", [(700, 10, -1), (1, 2, 3, 4), "700", (700.0,), (True,)])
def test_bad_gc_thresholds_are_reported(settings, thresholds):
    settings.REALTIME = {"GC_THRESHOLDS": thresholds}
    [error] = check_settings()
    assert error.id == "realtime.E015"


@pytest.mark.parametrize("thresholds", [None, (700,), [700, 10, 1000], (0, 0, 0)])
def test_good_gc_thresholds_pass(settings, thresholds):
    settings.REALTIME = {"GC_THRESHOLDS": thresholds}
    assert check_settings() == []


# -- production checks ---------------------------------------------------------------------

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
REDIS = {"default": {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"}}


def _ids(messages):
    return sorted(m.id for m in messages)


def test_in_memory_layer_is_an_error_outside_debug_or_with_several_workers(monkeypatch):
    from realtime.checks import check_channel_layer_in_production

    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    with override_settings(CHANNEL_LAYERS=IN_MEMORY, DEBUG=True):
        assert check_channel_layer_in_production() == []
        monkeypatch.setenv("WEB_CONCURRENCY", "4")
        assert _ids(check_channel_layer_in_production()) == ["realtime.E031"]
    monkeypatch.delenv("WEB_CONCURRENCY")
    with override_settings(CHANNEL_LAYERS=IN_MEMORY, DEBUG=False):
        assert _ids(check_channel_layer_in_production()) == ["realtime.E030"]
    with override_settings(CHANNEL_LAYERS=REDIS, DEBUG=False):
        monkeypatch.setenv("WEB_CONCURRENCY", "4")
        assert check_channel_layer_in_production() == []


def test_deploy_checks_fire_on_each_bad_setting_and_stay_quiet_on_good_ones():
    from realtime.checks import check_deployment

    good = {
        "DEBUG": False,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_SSL_REDIRECT": False,
        "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
    }
    with override_settings(**good):
        assert check_deployment() == []
    with override_settings(
        **{**good, "SECURE_PROXY_SSL_HEADER": None, "SECURE_SSL_REDIRECT": True}
    ):
        assert check_deployment() == []
    with override_settings(**{**good, "DEBUG": True}):
        assert _ids(check_deployment()) == ["realtime.E040"]
    with override_settings(**{**good, "SESSION_COOKIE_SECURE": False}):
        assert _ids(check_deployment()) == ["realtime.E041"]
    with override_settings(**{**good, "CSRF_COOKIE_SECURE": False}):
        assert _ids(check_deployment()) == ["realtime.E041"]
    with override_settings(**{**good, "SECURE_PROXY_SSL_HEADER": None}):
        assert _ids(check_deployment()) == ["realtime.E042"]
    # Errors: the release step (`check --deploy --fail-level ERROR`) stops on them.
    with override_settings(**{**good, "SESSION_COOKIE_SECURE": False}):
        assert all(m.is_serious() for m in check_deployment())


def test_allowed_hosts_star_outside_debug_is_an_error():
    from realtime.checks import check_allowed_hosts

    with override_settings(ALLOWED_HOSTS=["*"], DEBUG=False):
        assert _ids(check_allowed_hosts()) == ["realtime.E020"]
    with override_settings(ALLOWED_HOSTS=["example.com"], DEBUG=False):
        assert check_allowed_hosts() == []


def test_a_subscribe_burst_below_the_subscription_limit_is_a_warning():
    from realtime.checks import check_settings

    with override_settings(REALTIME={"SUBSCRIBE_BURST": 10, "MAX_SUBSCRIPTIONS": 100}):
        assert _ids(check_settings()) == ["realtime.W016"]
    with override_settings(REALTIME={"SUBSCRIBE_BURST": 100, "MAX_SUBSCRIPTIONS": 100}):
        assert check_settings() == []


# -- settings that would break at run time -------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("HEARTBEAT", None),
        ("HEARTBEAT", "25"),
        ("HEARTBEAT", 0),
        ("HEARTBEAT", -5),
        ("HEARTBEAT", float("nan")),
        ("CONNECTION_SWEEP_AFTER", None),
        ("SUBSCRIBE_BURST", None),
        ("MAX_SUBSCRIPTIONS", "100"),
        ("MAX_SUBSCRIPTIONS", 0),
        ("TICKET_TTL", None),
        ("REPLAY_BATCH", 0),
        ("MAX_CONNECTIONS_PER_USER", 2.5),
        ("ABUSE_LIMIT", True),
        ("PUBLISH_RATE", -1),
        ("RETENTION_MAX_EVENTS", -1),
        ("PUBLISH_TIMEOUT", float("inf")),
        ("HEARTBEAT", 10**400),  # past any float: math.isfinite raised
    ],
)
def test_bad_numbers_are_reported_instead_of_raising(settings, key, value):
    settings.REALTIME = {key: value}
    errors = check_settings()
    assert [e.id for e in errors] == ["realtime.E017"]
    assert f"REALTIME[{key!r}]" in errors[0].msg


@pytest.mark.parametrize(
    "realtime",
    [
        {"RETENTION_MAX_AGE": None, "RETENTION_MAX_EVENTS": None},
        {"LAYER_PROBE_INTERVAL": None, "AUTHZ_RECHECK_INTERVAL": None},
        {"HEARTBEAT": 10, "CONNECTION_SWEEP_AFTER": 60.5, "TICKET_TTL": 30.0},
        {"PUBLISH_RATE": 0, "PUBLISH_BURST": 0, "PUBLISH_QUEUE_SIZE": 0, "RELAY_GRACE": 0},
    ],
)
def test_good_numbers_pass(settings, realtime):
    settings.REALTIME = realtime
    assert check_settings() == []


@pytest.mark.parametrize(
    ("policies", "fragment"),
    [
        (["realtime.UserPolicy"], "must be a dict"),
        ({"User": "realtime.UserPolicy"}, "not a valid stream kind"),
        ({"my-kind": "realtime.UserPolicy"}, "not a valid stream kind"),
    ],
)
def test_stream_policies_of_the_wrong_shape_are_reported(settings, policies, fragment):
    settings.REALTIME = {"STREAM_POLICIES": policies}
    [error] = check_settings()
    assert error.id == "realtime.E013"
    assert fragment in error.msg


@pytest.mark.parametrize("header", [None, "", "X Correlation", "X-Id:", "X-Id\n", 42])
def test_bad_correlation_header_is_reported(settings, header):
    settings.REALTIME = {"CORRELATION_HEADER": header}
    [error] = check_settings()
    assert error.id == "realtime.E018"


def test_a_custom_correlation_header_passes(settings):
    settings.REALTIME = {"CORRELATION_HEADER": "X-Request-ID"}
    assert check_settings() == []


@pytest.mark.parametrize("resolver", ["board.nope.resolve", "board.models.Item.nope", 42])
def test_bad_tenant_resolver_is_reported(settings, resolver):
    settings.REALTIME = {"TENANT_RESOLVER": resolver}
    [error] = check_settings()
    assert error.id == "realtime.E019"


@pytest.mark.parametrize("resolver", [None, "realtime.context.new_correlation_id", len])
def test_good_tenant_resolvers_pass(settings, resolver):
    settings.REALTIME = {"TENANT_RESOLVER": resolver}
    assert check_settings() == []


@pytest.mark.parametrize(
    ("classes", "count"),
    [
        (None, 0),
        (["rest_framework.authentication.TokenAuthentication"], 0),
        ("rest_framework.authentication.TokenAuthentication", 1),  # a string, not a list
        (["rest_framework.authentication.Nope"], 1),
        (["realtime.conf.AppSettings"], 1),  # imports, but is no authentication class
        ([42, "board.nope.Auth"], 2),
    ],
)
def test_http_authentication_classes_are_checked(settings, classes, count):
    settings.REALTIME = {"HTTP_AUTHENTICATION_CLASSES": classes}
    errors = check_settings()
    assert [e.id for e in errors] == ["realtime.E025"] * count
    if count:
        assert "HTTP_AUTHENTICATION_CLASSES" in errors[0].msg
        assert [e.id for e in checks.run_checks(tags=["realtime"]) if e.id == "realtime.E025"]


def test_a_password_class_on_the_read_paths_is_warned_about(settings):
    settings.REST_FRAMEWORK = {}  # DRF's defaults: the session, and Basic
    [warning] = check_settings()
    assert warning.id == "realtime.W026"
    assert "BasicAuthentication" in warning.msg
    # Naming the read paths' own classes leaves DRF's defaults to the other views.
    settings.REALTIME = {
        "HTTP_AUTHENTICATION_CLASSES": [
            "rest_framework.authentication.SessionAuthentication",
            "rest_framework.authentication.TokenAuthentication",
        ]
    }
    assert check_settings() == []


def test_a_basic_subclass_is_warned_about_and_an_unimportable_drf_default_is_not_raised(settings):
    settings.REALTIME = {
        "HTTP_AUTHENTICATION_CLASSES": ["tests.test_http_credentials.Basicish"],
    }
    [warning] = check_settings()
    assert (warning.id, "Basicish" in warning.msg) == ("realtime.W026", True)
    settings.REALTIME = {}
    settings.REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": ["board.nope.Auth"]}
    assert check_settings() == []  # DRF's own list is DRF's to refuse


def test_an_unknown_key_is_reported_by_django_not_raised(settings):
    # Every check of the `realtime` tag runs; none may raise before E010 is shown.
    settings.REALTIME = {"CHANEL_LAYER": "default"}
    errors = checks.run_checks(tags=["realtime"])
    assert "realtime.E010" in [e.id for e in errors]


# -- presence settings ----------------------------------------------------------------------


@pytest.mark.parametrize("listed", [None, "many", -1, 10**400])
def test_presence_max_listed_that_is_no_count_is_reported(settings, listed):
    from presence.checks import check_backend

    settings.PRESENCE = {"MAX_LISTED": listed}
    assert "presence.E004" in _ids(check_backend())


@pytest.mark.parametrize("listed", [0, 100])
def test_presence_max_listed_counts_pass(settings, listed):
    from presence.checks import check_backend

    settings.PRESENCE = {"MAX_LISTED": listed}
    assert "presence.E004" not in _ids(check_backend())


@pytest.mark.parametrize("config", [["url"], "redis://127.0.0.1:6379/0"])
def test_presence_config_that_is_not_a_dict_is_reported(settings, config):
    from presence.checks import check_backend

    settings.PRESENCE = {"CONFIG": config}
    assert "presence.E005" in _ids(check_backend())


@pytest.mark.parametrize("serializer", ["presence.display.nope", "board.nope.Serializer", 42])
def test_presence_user_serializer_that_cannot_work_is_reported(settings, serializer):
    from presence.checks import check_backend

    settings.PRESENCE = {"USER_SERIALIZER": serializer}
    assert "presence.E006" in _ids(check_backend())


@pytest.mark.parametrize(
    "serializer", ["presence.display.user_display", "board.serializers.ItemSerializer", str]
)
def test_presence_user_serializers_that_work_pass(settings, serializer):
    from presence.checks import check_backend

    settings.PRESENCE = {"USER_SERIALIZER": serializer}
    assert "presence.E006" not in _ids(check_backend())


# -- notifications ----------------------------------------------------------------------------


@pytest.fixture
def user_kind_from_settings(monkeypatch):
    from realtime.policies import stream_kinds

    monkeypatch.setattr(
        stream_kinds, "_policies", {k: v for k, v in stream_kinds._policies.items() if k != "user"}
    )


@pytest.mark.parametrize(
    "realtime",
    [
        {"STREAM_POLICIES": {"user": "board.nope.UserPolicy"}},
        {"STREAM_POLICIES": [("user", "realtime.UserPolicy")]},
        {"STREAM_POLICIES": {}, "CHANEL_LAYER": "default"},
    ],
)
def test_the_user_stream_check_leaves_bad_settings_to_realtime(
    settings, user_kind_from_settings, realtime
):
    from notifications.checks import check_user_stream

    settings.REALTIME = realtime
    assert check_user_stream() == []  # realtime.E010 or E013 says what is wrong
    assert {e.id for e in check_settings()} & {"realtime.E010", "realtime.E013"}


def test_the_user_stream_check_reads_a_policy_from_settings(settings, user_kind_from_settings):
    from notifications.checks import check_user_stream

    settings.REALTIME = {"STREAM_POLICIES": {"user": "realtime.UserPolicy"}}
    assert check_user_stream() == []
    settings.REALTIME = {}
    assert _ids(check_user_stream()) == ["notifications.E001"]


@pytest.mark.parametrize("presence", [{"TTTL": 30}, ["TTL", 30]])
def test_a_presence_setting_of_the_wrong_shape_is_reported_not_raised(settings, presence):
    from presence.checks import check_backend

    settings.PRESENCE = presence
    [error] = check_backend()
    assert error.id == "presence.E007"
    assert "PRESENCE" in error.msg


@pytest.mark.parametrize(
    ("stream_serializers", "fragment"),
    [
        ([("tenant", None)], "stream_serializers must be a dict"),
        ({"Tenant": None}, "not a stream kind"),
        ({"tenant": 42}, "serializer must be"),
        ({"tenant": "board.nope.Ser"}, "cannot be imported"),
        ({"tenant": None}, "would send every concrete field"),
    ],
)
def test_bad_stream_serializers_are_reported(isolated_registry, stream_serializers, fragment):
    isolated_registry.register(
        Item, streams="project:{project_id}", stream_serializers=stream_serializers
    )
    assert any(fragment in m for m in messages(check_registrations()))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DEFAULT_VERSION", "V1"),
        ("DEFAULT_VERSION", 1),
        ("NODE_ID", "n" * 129),  # Connection.node holds 128: every connect would fail
        ("NODE_ID", 7),
        ("METRICS_PATH", ""),  # the view would answer at the include's root
        ("METRICS_PATH", "/"),
        ("METRICS_PATH", None),
    ],
)
def test_bad_names_are_reported(settings, key, value):
    settings.REALTIME = {key: value}
    errors = check_settings()
    assert [e.id for e in errors] == ["realtime.E021"]
    assert f"REALTIME[{key!r}]" in errors[0].msg


def test_good_names_pass(settings):
    settings.REALTIME = {"DEFAULT_VERSION": "v2", "NODE_ID": "web-1", "METRICS_PATH": "/m/x/"}
    assert check_settings() == []


@pytest.mark.parametrize("rate", ["", "off", "300", "300/fortnight", 300])
def test_a_write_rate_drf_cannot_parse_is_reported(settings, rate):
    from realtime.checks import check_write_rate

    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"realtime_writes": rate},
    }
    (error,) = check_write_rate()
    assert error.id == "realtime.E024"


@pytest.mark.parametrize("rate", ["300/min", "5/s", "1000/hour", "10/day", None])
def test_a_write_rate_drf_parses_passes(settings, rate):
    from realtime.checks import check_write_rate

    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"realtime_writes": rate},
    }
    assert check_write_rate() == []


@pytest.mark.parametrize(
    "value",
    [
        "redis://127.0.0.1:6379/0",  # a URL alone: the prefix would be guessed
        {"url": "http://127.0.0.1:6379"},
        {"url": "redis://x", "prefix": 3},
        {"url": "redis://x", "db": 1},
        {"prefix": "rt"},
    ],
)
def test_a_bad_shared_publish_bucket_setting_is_reported(settings, value):
    settings.REALTIME = {"PUBLISH_USER_REDIS": value}
    assert [e.id for e in check_settings()] == ["realtime.E027"]


@pytest.mark.parametrize(
    "value", [None, {"url": "redis://127.0.0.1:6379/0"}, {"url": "rediss://h", "prefix": "s"}]
)
def test_good_shared_publish_bucket_settings_pass(settings, value):
    settings.REALTIME = {"PUBLISH_USER_REDIS": value}
    assert check_settings() == []


def test_a_presence_backend_given_as_a_class_is_reported_not_raised(settings):
    from presence.backends.memory import MemoryBackend
    from presence.checks import check_backend

    settings.PRESENCE = {"BACKEND": MemoryBackend}
    assert _ids(check_backend()) == ["presence.E001"]
