"""Loopback TCP proxy that delays every new connection before forwarding it.

It simulates a server whose connections take `--delay` seconds to establish (a remote
database, a TLS handshake, a busy pgbouncer): each accepted client waits `--delay`
seconds, then the proxy opens its own connection to the target and pipes bytes both
ways without further delay.

    python bench/proxy.py --target-host 127.0.0.1 --target-port 5432 --delay 0.05

It listens on 127.0.0.1 only, prints one JSON line ``{"port": N}`` once listening,
and stops by itself after `--lifetime` seconds or when its standard input closes
(the parent is gone), whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys

BUFSIZE = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFSIZE):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class DelayProxy:
    def __init__(self, host: str | None, port: int, unix_path: str | None, delay: float):
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.delay = delay
        self.accepted = 0

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await asyncio.sleep(self.delay)
            if self.unix_path:
                s_reader, s_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                s_reader, s_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(_pipe(c_reader, s_writer), _pipe(s_reader, c_writer))


def _stdin_closed() -> asyncio.Future[None]:
    """A future done when stdin reaches EOF (the parent closed it or exited)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sys.stdin.fileno()

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not fut.done():
                fut.set_result(None)

    loop.add_reader(fd, on_readable)
    return fut


async def serve(proxy: DelayProxy, lifetime: float, watch_stdin: bool) -> None:
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0, backlog=512)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    waiters: list[asyncio.Future[None]] = [asyncio.ensure_future(asyncio.sleep(lifetime))]
    if watch_stdin:
        waiters.append(_stdin_closed())
    async with server:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-host", default="127.0.0.1")
    ap.add_argument("--target-port", type=int, default=5432)
    ap.add_argument("--target-unix", default=None, help="unix socket path instead of host")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds added to each connect")
    ap.add_argument("--lifetime", type=float, default=3600.0, help="stop after this many s")
    ap.add_argument("--no-stdin-watch", action="store_true")
    args = ap.parse_args(argv)
    if not args.target_unix and not args.target_host.startswith(("127.", "localhost", "::1")):
        ap.error("the proxy only forwards to loopback addresses")
    proxy = DelayProxy(args.target_host, args.target_port, args.target_unix, args.delay)
    asyncio.run(serve(proxy, args.lifetime, not args.no_stdin_watch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
