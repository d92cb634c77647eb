"""The attacks of issue 18 on a model server, shared by ``load_serve.py`` and ``server_compare.py``.

Each attack is a coroutine factory ``work(phase)`` as ``load_serve.run_phase`` runs it: it opens raw
sockets to 127.0.0.1 only, is bounded in time (``seconds``) and in connections, and records what it
saw in the phase (statuses of real requests beside the attack, notes on how the server treated the
attacking connections). The health probe and the memory sampling are ``run_phase``'s.

* ``tls_stall``: connections that open TCP and never send a TLS ClientHello (the server must count
  them and close them within its header deadline, else its file descriptors run out);
* ``headers_no_body``: connections that send an inference request's headers and never its body,
  beside clients sending real requests (which must not get 503 because the stalled ones hold slots);
* ``tiny_chunks``: connections that send a chunked body of 1-byte chunks as fast as they can,
  reconnecting whenever the server closes them (the event loop must stay free for health probes);
* ``duplicate_outputs``: a batch-64 request whose ``outputs`` list repeats one output until the body
  is 0.25 MB (the response must not multiply: refused, or de-duplicated);
* ``big_headers``: requests with ~100 KB of headers (the documented limit is 16 KiB: refused).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import time
from pathlib import Path

import httpx
import numpy as np

SHAPE = (1, 8, 8)
INFER = "/v2/models/model/infer"
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32", "data": [0.5] * 64}]}).encode()


def make_certificate(d: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PKCS#8 PEM, which every server here reads)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


async def real_requests(url: str, phase, until: float, body: bytes = BODY, max_requests: int = 100_000) -> None:
    """One ordinary client on one kept-alive connection, sending ``body`` back to back until ``until``."""
    async with httpx.AsyncClient(timeout=30.0, verify=False, limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(max_requests):
            if time.monotonic() >= until:
                return
            t0 = time.monotonic()
            try:
                r = await client.post(f"{url}{INFER}", content=body, headers={"Content-Type": "application/json"})
                phase.count(str(r.status_code))
                phase.latencies.append(time.monotonic() - t0)
            except httpx.HTTPError as exc:
                phase.count(type(exc).__name__)


async def _closed_within(reader: asyncio.StreamReader, until: float) -> bool:
    """Wait for the server to close (True) or for ``until`` (False), discarding what it sends."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return False
        try:
            if await asyncio.wait_for(reader.read(65536), timeout=left) == b"":
                return True
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True


def _note_closes(phase, what: str, n: int, opened: int, closed: list[float]) -> None:
    phase.notes.append(f"{opened} of {n} {what} opened; {len(closed)} closed by the server")
    if closed:
        phase.notes.append(f"closed after {np.percentile(closed, 50):.1f} s (median), {max(closed):.1f} s (max)")


def _stalled(port: int, first: bytes, seconds: float, n: int, what: str, real_url: str, real_clients: int):
    """``n`` connections that send ``first`` (maybe nothing) and then wait, beside ``real_clients`` real ones."""

    async def one(phase, i: int, closed: list[float], opened: list[int], until: float) -> None:
        await asyncio.sleep(i / 500)  # 500 new connections a second: a flood the listen queue takes, not a SYN storm
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=max(1.0, until - t0))
        except (OSError, TimeoutError) as exc:
            if len(phase.notes) < 3:
                phase.notes.append(f"attacking connection not opened: {type(exc).__name__}")
            return
        opened.append(1)
        try:
            if first:
                writer.write(first)
                await writer.drain()
            if await _closed_within(reader, until):
                closed.append(time.monotonic() - t0)
        except (ConnectionError, OSError):
            closed.append(time.monotonic() - t0)
        finally:
            writer.close()

    async def work(phase) -> None:
        closed: list[float] = []
        opened: list[int] = []
        until = time.monotonic() + seconds
        attack = [asyncio.create_task(one(phase, i, closed, opened, until)) for i in range(n)]
        await asyncio.sleep(0.5)  # the attack is in place before the real clients start
        real = [asyncio.create_task(real_requests(real_url, phase, until)) for _ in range(real_clients)]
        await asyncio.gather(*attack, *real)
        _note_closes(phase, what, n, len(opened), closed)

    return work


def tls_stall(url: str, port: int, n: int, seconds: float):
    """``n`` TCP connections to a TLS port that never send a ClientHello, beside 2 real clients."""
    return _stalled(port, b"", seconds, n, "pre-handshake connections", url, 2)


def headers_no_body(url: str, port: int, n: int, seconds: float):
    """``n`` connections that send infer headers (Content-Length of a real body) and no body, beside 4 real clients."""
    head = f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    return _stalled(port, head, seconds, n, "headers-only connections", url, 4)


def tiny_chunks(url: str, port: int, n: int, seconds: float):
    """``n`` connections sending 1-byte chunks of a chunked inference body as fast as they can, reconnecting when closed."""
    head = f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    burst = b"1\r\n \r\n" * 4096

    async def one(phase, stats: dict, until: float) -> None:
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=5)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            stats["connections"] += 1
            try:
                writer.write(head)
                while time.monotonic() < until and not reader.at_eof():
                    writer.write(burst)
                    await asyncio.wait_for(writer.drain(), timeout=max(0.01, until - time.monotonic()))
                    stats["chunks"] += 4096
                    await asyncio.sleep(0)
            except (ConnectionError, OSError, TimeoutError):
                pass
            finally:
                writer.close()

    async def work(phase) -> None:
        stats = {"connections": 0, "chunks": 0}
        until = time.monotonic() + seconds
        tasks = [asyncio.create_task(one(phase, stats, until)) for _ in range(n)]
        tasks.append(asyncio.create_task(real_requests(url, phase, until)))
        await asyncio.gather(*tasks)
        phase.notes.append(f"{n} chunking connection(s): {stats['connections']} connections opened, {stats['chunks']} 1-byte chunks written")

    return work


def duplicate_outputs_body(output: str = "label", size: int = 250_000) -> bytes:
    """A batch-64 request whose ``outputs`` repeats ``output`` until the body is about ``size`` bytes."""
    entry = {"name": output}
    base = {"inputs": [{"name": "input", "shape": [64, *SHAPE], "datatype": "FP32", "data": [0.5] * (64 * 64)}]}
    per = len(json.dumps(entry)) + 2
    repeat = max(1, (size - len(json.dumps(base))) // per)
    return json.dumps({**base, "outputs": [entry] * repeat}).encode()


def duplicate_outputs(url: str, clients: int, seconds: float, output: str = "label"):
    """``clients`` clients posting a 0.25 MB request of repeated outputs back to back; notes the response sizes."""
    body = duplicate_outputs_body(output)

    async def one(phase, sizes: list[int], until: float) -> None:
        async with httpx.AsyncClient(timeout=30.0, verify=False, limits=httpx.Limits(max_connections=1)) as client:
            while time.monotonic() < until:
                t0 = time.monotonic()
                try:
                    r = await client.post(f"{url}{INFER}", content=body, headers={"Content-Type": "application/json"})
                    phase.count(f"attack {r.status_code}")
                    sizes.append(len(r.content))
                    phase.latencies.append(time.monotonic() - t0)
                except httpx.HTTPError as exc:
                    phase.count(f"attack {type(exc).__name__}")

    async def work(phase) -> None:
        sizes: list[int] = []
        until = time.monotonic() + seconds
        await asyncio.gather(*(one(phase, sizes, until) for _ in range(clients)), real_requests(url, phase, until))
        if sizes:
            phase.notes.append(f"request {len(body) / 1e6:.2f} MB; response {max(sizes) / 1e6:.2f} MB at most ({max(sizes) / len(body):.0f}x)")

    return work


def big_headers(url: str, clients: int, seconds: float, size: int = 100_000):
    """``clients`` clients sending requests with ``size`` bytes of headers (100 headers) back to back."""
    headers = {f"X-Pad-{i}": "a" * (size // 100 - 12) for i in range(100)}

    async def one(phase, until: float) -> None:
        async with httpx.AsyncClient(timeout=30.0, verify=False, limits=httpx.Limits(max_connections=1)) as client:
            while time.monotonic() < until:
                try:
                    r = await client.post(f"{url}{INFER}", content=BODY, headers={"Content-Type": "application/json", **headers})
                    phase.count(f"attack {r.status_code}")
                except httpx.HTTPError as exc:
                    phase.count(f"attack {type(exc).__name__}")

    async def work(phase) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(one(phase, until) for _ in range(clients)), real_requests(url, phase, until))
        phase.notes.append(f"headers of {sum(len(k) + len(v) + 4 for k, v in headers.items()) / 1000:.0f} KB per attacking request")

    return work
