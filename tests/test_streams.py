import re

import pytest

from realtime.streams import InvalidStreamName, group_name, is_valid_stream, parse_stream

CHANNELS_GROUP = re.compile(r"^[a-zA-Z\d\-_.]{1,99}$")


def test_parse_splits_kind_and_key():
    assert parse_stream("project:42") == ("project", "42")
    assert parse_stream("tenant:acme.eu") == ("tenant", "acme.eu")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "project",
        ":42",
        "project:",
        "Project:1",
        "project:4 2",
        "a:" + "x" * 129,
        "project:42:1",
        None,
        42,
        "pro ject:1",
        "project:\n",
        "project:1\n",  # `$` alone lets a final newline through
        "project\n:1",
    ],
)
def test_parse_rejects_malformed(bad):
    with pytest.raises(InvalidStreamName):
        parse_stream(bad)
    assert not is_valid_stream(bad)


def test_group_name_is_readable_for_simple_names():
    assert group_name("project:42") == "rt.project.42"


@pytest.mark.parametrize(
    "stream",
    [
        "project:42",
        "tenant:acme.eu",
        "tenant:acme_eu",
        "user:a@b",
        "a_b:c",
        "k:" + "z" * 128,
        "k:~+=@",
    ],
)
def test_group_names_are_valid_for_channels(stream):
    assert CHANNELS_GROUP.match(group_name(stream))


def test_group_names_do_not_collide():
    streams = [
        "tenant:a.b",
        "tenant:a_b",
        "tenant:a_2eb",
        "tenant_a:b",
        "tenant:a-b",
        "a_b:c",
        "a:b_c",
        "k:" + "z" * 128,
        "k:" + "z" * 127 + "y",
    ]
    names = [group_name(s) for s in streams]
    assert len(set(names)) == len(names)


def test_group_prefix_follows_settings(settings):
    settings.REALTIME = {"GROUP_PREFIX": "app1"}
    assert group_name("project:1") == "app1.project.1"


def test_group_names_stay_valid_for_the_longest_prefix_and_kind(settings):
    # A 20-character prefix and a 32-character kind of underscores (each escaped to three
    # characters) made a hashed name of 158 characters, which Channels refuses every time.
    settings.REALTIME = {"GROUP_PREFIX": "acme-production-eu01"}
    streams = [
        "project_task_comment_attachments:1",
        "a" + "_" * 31 + ":x",
        "a" + "_" * 31 + ":" + "y" * 128,
        "a" + "_" * 30 + "b:x",
        "h:" + "0" * 40,
        "k:" + "z" * 128,
    ]
    names = [group_name(s) for s in streams]
    for name in names:
        assert CHANNELS_GROUP.match(name), name
    assert len(set(names)) == len(names)
    # Names that fit keep their kind, for whoever reads the layer's keys.
    assert group_name("project_task_comment_attachments:1").startswith(
        "acme-production-eu01.project_5ftask"
    )
