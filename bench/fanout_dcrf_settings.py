"""Settings of the DCRF nodes of the fan-out benchmark: fanout_settings, DCRF's layer as default.

djangochannelsrestframework sends its model-observer messages with `get_channel_layer()`, the
`default` alias, so its nodes get the `RedisChannelLayer` of plain Channels (the "plain" alias
of fanout_settings: same Redis, same prefix of the run's own) as their default layer. Its groups
are named `DCRF-<sha256>`, apart from plain Channels' `items-<pk>`. The writer (fanout.py) sends
through the same layer with `override_settings` while it writes for DCRF.
"""

from __future__ import annotations

from fanout_settings import *  # noqa: F403
from fanout_settings import CHANNEL_LAYERS

#: The fanout_settings alias whose layer DCRF uses as its default.
DCRF_LAYER = "plain"
CHANNEL_LAYERS = {**CHANNEL_LAYERS, "default": CHANNEL_LAYERS[DCRF_LAYER]}
