"""A slow local HTTP server: every answer takes ``delay`` seconds, like a remote API.

It runs on an event loop in a thread of its own, so a thousand waiting requests cost
nothing, and it counts how many requests it holds at once, per first path segment.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

BODY = b'{"ok": true}'


class SlowHTTPServer:
    """An HTTP server on a free loopback port; ``/<label>/...`` requests are counted by label."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = 0
        self.holding: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="slow-http-server", daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowHTTPServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the slow HTTP server did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> SlowHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._answer, "127.0.0.1", 0, backlog=1024)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1].decode(errors="replace")
            label = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
            self.holding[label] += 1
            self.peak[label] = max(self.peak[label], self.holding[label])
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.holding[label] -= 1
            self.served[label] += 1
            head = (
                f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}"
            )
            writer.write(head.encode() + b"\r\nConnection: close\r\n\r\n" + BODY)
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            IndexError,
        ):
            pass
        finally:
            writer.close()
