"""A loopback TCP proxy that loses replies on purpose, for the lost-reply tests.

    proxy = ReplyDroppingProxy("127.0.0.1", 6379).start()
    proxy.drop_replies(b"w-lost", times=2)   # the next 2 requests containing b"w-lost"
                                             # reach Redis, but their replies do not
                                             # reach the client: the proxy reads the
                                             # reply, throws it away and closes both
                                             # sides of that connection.
    ...
    proxy.stop()

Because the reply is read before the connection is cut, the request is known to
have been executed by Redis: exactly the "applied, but the client never heard"
case a retry must survive. The proxy only forwards bytes (threads per connection);
it does not parse RESP, so a marker must lie inside one request that is sent in one
piece (any small command).
"""

from __future__ import annotations

import socket
import threading
from typing import Optional


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.doomed = False      # the next reply from Redis on this link is dropped
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:<port> to ``target_host:target_port``; see the module doc."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._marker: Optional[bytes] = None
        self._remaining = 0
        self._links: list[_Link] = []
        self.dropped = 0          # replies thrown away so far
        self.connections = 0      # client connections accepted so far
        self._stopped = False

    def start(self) -> "ReplyDroppingProxy":
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()
        return self

    def drop_replies(self, marker: bytes, times: int = 1) -> None:
        """Lose the replies of the next ``times`` requests that contain ``marker``."""
        with self._lock:
            self._marker, self._remaining = marker, times

    def cut_all(self) -> None:
        """Close every open connection (both sides) at once."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        self.cut_all()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            threading.Thread(target=self._requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._replies, args=(link,), daemon=True).start()

    def _requests(self, link: _Link) -> None:
        """Client -> Redis: forward everything; arm the drop when the marker passes."""
        try:
            while True:
                data = link.client.recv(65536)
                if not data:
                    break
                with self._lock:
                    if self._remaining > 0 and self._marker and self._marker in data:
                        self._remaining -= 1
                        link.doomed = True
                link.upstream.sendall(data)
        except OSError:
            pass
        link.close()

    def _replies(self, link: _Link) -> None:
        """Redis -> client: forward, except a doomed link's reply, which is dropped
        together with the connection."""
        try:
            while True:
                data = link.upstream.recv(65536)
                if not data:
                    break
                if link.doomed:
                    with self._lock:
                        self.dropped += 1
                    break
                link.client.sendall(data)
        except OSError:
            pass
        link.close()
