"""A loopback TCP proxy that can lose a reply, to test writes whose outcome is unknown."""

from __future__ import annotations

import contextlib
import socket
import threading


class ReplyDroppingProxy:
    """Forwards 127.0.0.1:<port> to a server; can swallow the reply to a chosen command.

    After ``arm(marker, times)``, the next ``times`` requests that contain ``marker``
    reach the server and run, but their replies are thrown away and the client's
    connection is closed, as when a network drops a reply.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.marker = b""
        self.remaining = 0
        self.dropped = 0
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, marker: bytes, times: int = 1) -> None:
        with self.lock:
            self.marker, self.remaining = marker, times

    def close(self) -> None:
        self.closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"drop_next_reply": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self.lock:
                    if self.remaining and self.marker in data:
                        self.remaining -= 1
                        state["drop_next_reply"] = True
                upstream.sendall(data)
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if state["drop_next_reply"]:
                    with self.lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        _close(client, upstream)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
