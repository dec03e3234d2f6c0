"""The `basic` server over streamable HTTP on 127.0.0.1: prints its port on stdout once it listens."""

from __future__ import annotations

import socket

import anyio
import uvicorn
from _common import startup
from basic import mcp


async def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(mcp.streamable_http_app(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    print(sock.getsockname()[1], flush=True)
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    startup()
    anyio.run(main)
