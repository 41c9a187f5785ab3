"""Reproduce the uvloop crash described in docs/design-notes.md ("A fully shut-down transport").

A loopback echo server whose protocol answers the client's EOF with ``write_eof()`` and, in mode
``linger``, leaves the transport open although both directions have ended; in mode ``close`` it
closes the transport at that point, as socksd's relay does. Clients (threads) each send a few
bytes, shut down their sending side and read until EOF, ``--clients`` at a time.

    python3 bench/uvloop_half_close.py linger   # uvloop 0.21-0.23: the server dies (SIGABRT/SIGSEGV)
    python3 bench/uvloop_half_close.py close    # the server survives
    python3 bench/uvloop_half_close.py linger --loop asyncio   # survives too

Loopback only; ends by itself (bounded session count, socket timeouts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import threading
import time
from typing import cast


class HalfCloseEcho(asyncio.Protocol):
    def __init__(self, close_when_done: bool) -> None:
        self.close_when_done = close_when_done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write_eof()  # forward the half-close, as a relay does
        if self.close_when_done:
            self.transport.close()  # EOF received and EOF sent: nothing more can happen
        return True


def serve(listener: socket.socket, close_when_done: bool, loop_name: str) -> None:
    if loop_name == "uvloop":
        import uvloop

        uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: HalfCloseEcho(close_when_done), sock=listener)
        await server.serve_forever()

    asyncio.run(main())


def client_load(port: int, sessions: int, clients: int) -> tuple[int, int]:
    ok = failed = 0
    lock = threading.Lock()

    def run(count: int) -> None:
        nonlocal ok, failed
        for _ in range(count):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
                    sock.sendall(b"x" * 32)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(4096):
                        pass
                with lock:
                    ok += 1
            except OSError:
                with lock:
                    failed += 1

    threads = [threading.Thread(target=run, args=(sessions // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ok, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("linger", "close"))
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--sessions", type=int, default=16000)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        serve(listener, args.mode == "close", args.loop)
        os._exit(0)
    listener.close()
    time.sleep(0.3)
    ok, failed = client_load(port, args.sessions, args.clients)
    done, status = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        verdict = "alive"
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    elif os.WIFSIGNALED(status):
        verdict = f"died of {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        verdict = f"exited with {os.WEXITSTATUS(status)}"
    print(f"{args.loop}, {args.mode}: {ok} sessions ok, {failed} failed; the server {verdict}")


if __name__ == "__main__":
    main()
