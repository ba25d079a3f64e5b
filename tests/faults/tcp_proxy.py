"""A loopback TCP proxy that a test can pause: a network partition without a reset."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

_POLL = 0.1  # how often blocked threads look at the pause and stop flags
_CHUNK = 64 * 1024


class _Link:
    """One proxied connection: the client's socket and, once connected, the target's."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.open = 2  # pumps still running
        self.lost = False  # black-holed for good: it never flows again


class TcpProxy:
    """Forwards connections from a free loopback port to `target`; `pause()` black-holes them.

    While paused, no byte moves in either direction and nothing is closed: bytes wait in the
    kernel's socket buffers (and in the peers' own buffers), as they would behind a broken
    link that TCP keeps retransmitting over. New connections are accepted but held, not
    connected onward, until `resume()`. A close by either end reaches the other end only
    while the proxy flows. `resume(revive=False)` lets new connections flow but keeps the ones
    that were open during the pause black-holed for good, as a NAT or firewall that lost
    their state would. Every thread is a daemon polling a stop flag, and `close()` (or leaving
    the `with` block) ends them all.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._links: set[_Link] = set()  # connected onward and not closed
        self._threads: list[threading.Thread] = []
        self.accepted = 0  # connections accepted from clients
        self.accepted_while_paused = 0
        self.closed_by_client = 0  # connections whose client end hung up first
        self.pauses = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> TcpProxy:
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def pause(self) -> None:
        """Stop moving bytes on every connection, open or new, without closing any."""
        self.pauses += 1
        self._flowing.clear()

    def resume(self, *, revive: bool = True) -> None:
        """Move bytes again; with `revive=False`, only on connections opened from now on."""
        if not revive:
            with self._lock:
                for link in self._links:
                    link.lost = True
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def close(self) -> None:
        self._stopped.set()
        self._flowing.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            sock.close()
        for thread in self._threads:
            thread.join(2)

    # -- threads ---------------------------------------------------------------------------

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> socket.socket:
        sock.settimeout(_POLL)
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _wait_flowing(self, link: _Link | None = None) -> bool:
        """Block while paused (or, for a lost link, for good); False once the proxy closes."""
        while not self._stopped.is_set():
            if self._flowing.wait(_POLL) and not (link is not None and link.lost):
                return True
            if link is not None and link.lost:
                self._stopped.wait(_POLL)
        return False

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            self.accepted += 1
            if self.paused:
                self.accepted_while_paused += 1
            self._spawn(self._connect, "proxy-connect", _Link(self._track(client)))

    def _connect(self, link: _Link) -> None:
        if not self._wait_flowing():  # held until the link is back
            return
        try:
            upstream = self._track(socket.create_connection(self.target, timeout=5))
        except OSError:
            link.client.close()
            return
        with self._lock:
            self._links.add(link)
        self._spawn(self._pump, "proxy-up", link, link.client, upstream, True)
        self._spawn(self._pump, "proxy-down", link, upstream, link.client, False)

    def _send(self, link: _Link, sink: socket.socket, data: bytes) -> bool:
        # A chunk read just before a pause waits here: nothing moves while paused.
        view = memoryview(data)
        while view:
            if not self._wait_flowing(link):
                return False
            try:
                view = view[sink.send(view) :]
            except TimeoutError:
                continue  # the receiver's buffer is full: back-pressure, not an error
        return True

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while self._wait_flowing(link):
                try:
                    data = source.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    if upward and link.open == 2:  # the client hung up first
                        self.closed_by_client += 1
                    break
                if not self._send(link, sink, data):
                    break
        except OSError:
            pass
        finally:
            with self._lock:
                link.open -= 1
                self._links.discard(link)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                with self._lock:
                    self._sockets.discard(sock)
