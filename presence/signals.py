"""Signals for server code (last seen, analytics). Sent once per join and per leave.

`presence_joined`: sender is the stream kind's policy class; kwargs `stream`, `user_id`.
`presence_left`: the same, plus `reason`: "disconnect", "unsubscribe", "forbidden" or
"expired" (a node died or stopped refreshing).
Receivers run in a worker thread (they may use the ORM); one that raises is logged.
"""

from django.dispatch import Signal

presence_joined = Signal()
presence_left = Signal()
