"""Token buckets for client publishes, per socket and per user (per node)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver

from .conf import realtime_settings

_USERS_KEPT = 10_000


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` spends one if there is one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")  # one per socket: no __dict__

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """Return the token of a `take()` that another bucket then refused."""
        self.tokens = min(self.burst, self.tokens + 1.0)


_user_buckets: OrderedDict[Any, TokenBucket] = OrderedDict()


def user_bucket(user_id: Any) -> TokenBucket:
    """The bucket shared by all of one user's sockets on this node (bounded LRU)."""
    bucket = _user_buckets.get(user_id)
    if bucket is None:
        bucket = TokenBucket(realtime_settings.PUBLISH_RATE, realtime_settings.PUBLISH_BURST)
        _user_buckets[user_id] = bucket
        if len(_user_buckets) > _USERS_KEPT:
            _user_buckets.popitem(last=False)
    else:
        _user_buckets.move_to_end(user_id)
    return bucket


@receiver(setting_changed)
def _forget_user_buckets(setting: str, **kwargs: Any) -> None:
    """New `REALTIME` settings (tests): users' buckets are made again with its rate and burst."""
    if setting == "REALTIME":
        _user_buckets.clear()
