"""A TCP proxy between a client and a server that can lose a reply: the server did the work,
the client sees its connection drop. For tests of what a lost reply must not cause."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.services import free_port


class ReplyCutter:
    """Forwards 127.0.0.1:port to the upstream port. After ``cut_next_reply()``, the next
    chunk the server sends on any connection is dropped and that connection closed."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._armed = threading.Event()
        self._marker = b""
        self.cut = threading.Event()  # set once a reply was lost
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next_reply(self, containing: bytes = b"") -> None:
        """Lose the next reply (that holds ``containing``, when given)."""
        self.cut.clear()
        self._marker = containing
        self._armed.set()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if from_server and self._armed.is_set() and self._marker in chunk:
                    self._armed.clear()
                    self.cut.set()
                    break  # the reply is lost with the connection
                sink.sendall(chunk)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        for s in self._sockets:
            s.close()
