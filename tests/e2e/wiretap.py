"""A recording TCP forwarder on loopback: what a GSSAPI client and server put on the wire."""

from __future__ import annotations

import socket
import threading


class Tap:
    """A loopback TCP forwarder to ``port`` recording what passes: ``up`` (to it), ``down``."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = bytearray()
        self.down = bytearray()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(30)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target), timeout=30)
        for src, dst, log in ((client, server, self.up), (server, client, self.down)):
            t = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        src.settimeout(30)
        try:
            while chunk := src.recv(65536):
                log += chunk
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for t in self._threads:
            t.join(10)
        self.listener.close()
