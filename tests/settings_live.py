"""Settings for daphne children of tests: the demo's, with REALTIME keys from the environment."""

import json
import os

from config.settings import *  # noqa: F403

REALTIME = {**REALTIME, **json.loads(os.environ.get("TEST_REALTIME", "{}"))}  # noqa: F405
PRESENCE = {**PRESENCE, **json.loads(os.environ.get("TEST_PRESENCE", "{}"))}  # noqa: F405
