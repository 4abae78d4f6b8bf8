"""Serving the gateway's app on uvicorn: until SIGINT/SIGTERM, saying where it listens once bound."""

from __future__ import annotations

import logging
import socket

import uvicorn
from starlette.applications import Starlette


class _Server(uvicorn.Server):
    """Says where it listens once the socket is bound (the port is only known then, with --port 0)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"ryzanstein gateway: serving http://{shown}:{port}/v1 (Ctrl-C stops it)", flush=True)


def serve(app: Starlette, *, host: str, port: int, access_log: bool = False) -> bool:
    """Run ``app`` on uvicorn until SIGINT/SIGTERM; False if it could not start (port taken...)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    server = _Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=access_log,
                                    log_level=level, lifespan="on", timeout_graceful_shutdown=5))
    server.run()
    return server.started
