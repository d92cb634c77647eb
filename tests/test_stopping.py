"""``server/_stopping.py``: uvicorn's server that stops when asked, with uvicorn's graceful shutdown (the waiting
for running requests and its time bound). Real sockets on 127.0.0.1; a bare ASGI app whose requests never end.
(A running request that ends in time gets its answer: tests/test_server_guard.py.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from tamperprobe.server._stopping import PromptServer


async def _never_answers(scope, receive, send):  # an ASGI app: each request runs until it is cancelled
    if scope["type"] == "http":
        await asyncio.sleep(60)


def test_a_request_running_past_the_graceful_time_is_cancelled_and_the_server_stops():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = PromptServer(uvicorn.Config(_never_answers, log_level="critical", lifespan="off", timeout_graceful_shutdown=0.3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    client = socket.create_connection(sock.getsockname(), timeout=20)
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    while not server.server_state.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server_state.tasks  # the request is running
    started = time.monotonic()
    server.request_exit()
    thread.join(20)
    took = time.monotonic() - started
    assert not thread.is_alive() and 0.25 <= took < 10, took  # it waited the graceful time for the request, then cancelled it
    assert client.recv(65536).startswith(b"HTTP/1.1 500 ")  # uvicorn's answer for a request cancelled before it answered
    client.close()
    sock.close()
