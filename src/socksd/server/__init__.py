"""The asyncio server around the sans-I/O core.

listener (accept, limits, shutdown) -> session (negotiate, authenticate, request) -> one module
per command (``connect``) -> relay (copy both ways, half-close, backpressure) -> access log.
"""

from socksd.server.process.context import ServerContext
from socksd.server.process.listener import Server
from socksd.server.process.run import run, serve

__all__ = ["Server", "ServerContext", "run", "serve"]
