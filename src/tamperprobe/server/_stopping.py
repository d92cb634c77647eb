"""uvicorn's server for ``ServerThread`` and ``serve``: it stops when asked, not at its next tick and a fixed pause later.

``uvicorn.Server`` notices ``should_exit`` on a 0.1 s tick and then pauses 0.1 s after asking its connections to
close, before it waits for them in 0.1 s steps: every stop of a server (tests and the demo start many) took 0.15 s
or more of doing nothing. ``PromptServer`` takes the same steps in the same order: its tick is still 0.1 s (the Date
header is refreshed on it) but ``request_exit`` (``ServerThread.stop``, any thread) and uvicorn's own signal handler
(``serve``: SIGINT, SIGTERM) wake it at once; the shutdown stops accepting, asks every connection to close and waits
for them and for the running requests, up to the configured ``timeout_graceful_shutdown``, checking every few
milliseconds instead of every 0.1 s, and cancels what is left. A second SIGINT still forces the exit, as uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn

_TICK = 0.1  # uvicorn's own: on_tick counts these (the Date header is refreshed every 10th)
_POLL = 0.005  # how often the shutdown looks whether the connections and requests are gone
_log = logging.getLogger("uvicorn.error")  # uvicorn's own lines about the shutdown, where uvicorn writes them


class PromptServer(uvicorn.Server):
    """``uvicorn.Server`` whose ``request_exit`` (from any thread) ends ``run`` promptly."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def request_exit(self) -> None:
        """Ask the server to stop, from any thread: its loop wakes now instead of at the next tick."""
        self.should_exit = True
        self._wake_up()

    def handle_exit(self, sig: int, frame: Any) -> None:
        """uvicorn's handler of SIGINT and SIGTERM (it sets ``should_exit``, or ``force_exit`` on a second SIGINT), then the wake-up."""
        super().handle_exit(sig, frame)
        self._wake_up()

    def _wake_up(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already: nothing to wake
                loop.call_soon_threadsafe(wake.set)  # safe in a signal handler too (asyncio.Runner wakes its loop so on SIGINT)

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        _log.info("Shutting down")
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state: Any = self.server_state
        for connection in list(state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                await self._drained(state)
        except TimeoutError:
            _log.error("Cancel %s running task(s), timeout graceful shutdown exceeded", len(state.tasks))
            for task in list(state.tasks):
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drained(self, state: Any) -> None:
        """Until the connections have closed, then the running requests have ended (a forced exit stops waiting)."""
        for what, left in (("connections to close", state.connections), ("background tasks to complete", state.tasks)):
            if left and not self.force_exit:
                _log.info("Waiting for %s. (CTRL+C to force quit)", what)
            while left and not self.force_exit:
                await asyncio.sleep(_POLL)
        for server in self.servers:
            await server.wait_closed()
