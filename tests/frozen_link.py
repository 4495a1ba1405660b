"""A TCP link on loopback that can freeze: a hung coordinator, as its devices see it.

Bytes flow both ways until `freeze()`; from then on nothing more is read or written, and the
connections stay open. That is what a device sees of a coordinator that stopped (SIGSTOP, a
wedged host, a partition): no answer, no reset, no close. A stopped listener, by contrast,
closes its connections, which gRPC notices at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class FrozenLink:
    def __init__(self, upstream: str) -> None:
        self._host, port = upstream.rsplit(":", 1)
        self._port = int(port)
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.address = ""
        self.held_bytes = 0  # received after the freeze, never passed on

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def freeze(self) -> None:
        self._thawed.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(1 << 16):
                if not self._thawed.is_set():
                    self.held_bytes += len(data)
                    await asyncio.Event().wait()  # frozen: hold the bytes, answer nothing
                sink.write(data)
                await sink.drain()


@contextlib.asynccontextmanager
async def frozen_link(upstream: str) -> AsyncIterator[FrozenLink]:
    link = FrozenLink(upstream)
    await link.start()
    try:
        yield link
    finally:
        await link.close()
