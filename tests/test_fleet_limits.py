"""A fleet's limits on the wire: connections per server, the kept-alive default, and a malformed ``expect`` refused before sending.

The server is a real ``tamperprobe serve`` (``ServerThread``) behind a relay on 127.0.0.1 that counts
the connections open at once and holds every answer a little, so that runs overlap.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fakes import free_port
from tamperprobe import zoo
from tamperprobe.cli.app import app
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import TorchModel
from tamperprobe.server.app import ServerThread

GRACE = 0.05  # seconds an accepted connection waits before it is counted: a close the client made before connecting is seen first


class CountingRelay:
    """Forwards each connection to ``upstream``; ``most`` is the largest number of client connections open at once."""

    def __init__(self, upstream: int, hold: float) -> None:
        self.upstream, self.hold, self.port = upstream, hold, free_port()
        self.open = self.most = self.accepted = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: float) -> None:
            try:
                while data := await reader.read(65536):
                    if hold:
                        await asyncio.sleep(hold)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            await asyncio.sleep(GRACE)  # the client closed its previous connection before opening this one: let the loop see that first
            self.accepted += 1
            self.open += 1
            self.most = max(self.most, self.open)
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
                await asyncio.gather(pipe(cr, uw, 0.0), pipe(ur, cw, self.hold))
            finally:
                self.open -= 1
                cw.close()

        async def main() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self.ready.set()
            async with self.server:
                await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def close(self) -> None:
        def stop() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def world(digits, tmp_path_factory):
    train, test = digits
    torch.manual_seed(0)
    model = TorchModel(zoo.build("mlp", (1, 8, 8)).eval(), "intact")
    root = tmp_path_factory.mktemp("fleet-limits")
    x = np.ascontiguousarray(test.x[:200])
    fp = make_fingerprint(x, model.logits(x), train.input_spec, {"method": "natural"}, model.digest(), output_spec="logits")
    save(fp, root / "fp.tpf")
    with ServerThread(model, input_spec=train.input_spec) as server:
        yield {"root": root, "fp": root / "fp.tpf", "server": server}


def fleet_file(tmp_path: Path, world, url: str, n: int, *, limit: int, extra: str = "", name: str = "fleet.toml") -> Path:
    lines = ["[fleet]", f"per_endpoint_connections = {limit}", f"concurrency = {n}", "", "[defaults]"]
    lines += [f'fingerprint = "{world["fp"]}"', "allow_unsigned = true", "per_run = 3", "decoys = 0", "retries = 0", extra]
    for i in range(n):
        lines += ["", "[[endpoint]]", f'name = "e{i}"', f'url = "{url}"']
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def check(path: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    r = CliRunner().invoke(app, ["fleet", "check", str(path), "--json", "--history", str(tmp_path / "h.sqlite")])
    return r.exit_code, json.loads(r.stdout) if r.stdout.strip().startswith("[") else r.output


@pytest.mark.parametrize("profile", ["", 'client_profile = "python-requests"'], ids=["kept-alive default", "python-requests"])
def test_per_endpoint_connections_bounds_the_connections_one_server_sees(world, tmp_path, profile):
    """Eight entries of one server, eight at once: the server never has more than the limit open, and all are verified."""
    upstream = int(world["server"].url.rsplit(":", 1)[1].split("/")[0])
    relay = CountingRelay(upstream, hold=0.03)  # per answer chunk (headers and body come apart): a run holds its connection 0.2 s
    try:
        url = f"http://127.0.0.1:{relay.port}/v2/models/model"
        code, rows = check(fleet_file(tmp_path, world, url, 8, limit=2, extra=profile), tmp_path)
        assert code == 0 and [r["verdict"] for r in rows] == ["INTACT"] * 8, rows
        assert relay.most == 2  # the limit held, and was reached
        limited = relay.accepted
        relay.most = 0
        code, rows = check(fleet_file(tmp_path, world, url, 8, limit=8, extra=profile, name="wide.toml"), tmp_path)
        assert code == 0
        assert relay.most > 2  # without the limit, the same fleet opens more at once: the limit is what bounded it
    finally:
        relay.close()
    # kept alive: one connection per entry's run; python-requests: one per request (4 a run: metadata and 3 markers)
    assert limited == (8 if not profile else 8 * 4)


def test_a_malformed_expect_is_a_file_error_before_anything_is_sent(world, tmp_path):
    upstream = int(world["server"].url.rsplit(":", 1)[1].split("/")[0])
    relay = CountingRelay(upstream, hold=0.0)
    try:
        path = fleet_file(tmp_path, world, f"http://127.0.0.1:{relay.port}", 3, limit=2)
        path.write_text(path.read_text().replace('name = "e1"', 'name = "e1"\nexpect = "digits-v3"'))
        r = CliRunner().invoke(app, ["fleet", "check", str(path)])
    finally:
        relay.close()
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and str(path) in line
    assert "endpoint 2 (e1): field 'expect' must be a fingerprint id (16 hex digits) or NAME:VERSION" in line
    assert relay.accepted == 0  # nothing was sent to any entry


def test_a_well_formed_expect_that_does_not_match_refuses_that_entry_only(world, tmp_path):
    upstream = int(world["server"].url.rsplit(":", 1)[1].split("/")[0])
    relay = CountingRelay(upstream, hold=0.0)
    try:
        path = fleet_file(tmp_path, world, f"http://127.0.0.1:{relay.port}", 3, limit=2)
        path.write_text(path.read_text().replace('name = "e1"', 'name = "e1"\nexpect = "digits:v3"'))
        code, rows = check(path, tmp_path)
    finally:
        relay.close()
    assert code == 3
    assert [r["verdict"] for r in rows] == ["INTACT", "NOT AUTHENTIC", "INTACT"]
    assert "not the one expected (digits:v3)" in rows[1]["problem"]
    assert relay.accepted == 2  # the two others were verified on one kept-alive connection each; nothing went to e1


def test_a_pass_whose_history_writes_fail_keeps_its_verdicts_and_its_markers_spent(world, tmp_path, monkeypatch):
    """The runs of a pass are written in batches after their verdicts; their draws were committed before sending (fail closed)."""
    from tamperprobe.fingerprint import load
    from tamperprobe.fleet import check, config
    from tamperprobe.served import history, ledger

    def broken(*_a, **_k):
        raise history.HistoryError("disk full")

    monkeypatch.setattr(history, "record_many", broken)  # as if the process died before the pass's records were written
    url = world["server"].url + "/v2/models/model"
    fleet = config.load(fleet_file(tmp_path, world, url, 4, limit=4))
    warnings: list[tuple[str, str]] = []
    hist = tmp_path / "h.sqlite"
    outcomes = check.check(fleet, history_path=hist, on_warning=lambda name, text: warnings.append((name, text)))
    assert [o.verdict for o in outcomes] == ["INTACT"] * 4
    assert sorted(name for name, _ in warnings) == ["e0", "e1", "e2", "e3"]
    assert all("not recorded in the history: disk full" in text for _, text in warnings)
    assert history.runs(hist) == []  # nothing said about the runs...
    spent = ledger.drawn(load(world["fp"], trust=None).id, hist)["marker"]
    assert len(spent) == 4 * 3  # ...but every marker they sent is spent, so none is sent again


def test_a_pass_records_every_run_once(world, tmp_path):
    from tamperprobe.fleet import check, config
    from tamperprobe.served import history

    url = world["server"].url + "/v2/models/model"
    fleet = config.load(fleet_file(tmp_path, world, url, 6, limit=3))
    hist = tmp_path / "h.sqlite"
    outcomes = check.check(fleet, history_path=hist)
    runs = history.runs(hist, limit=None)
    assert sorted(r["draw"] for r in runs) == sorted(o.run.report.draw for o in outcomes if o.run is not None)
    assert len(runs) == 6 and {r["verdict"] for r in runs} == {"INTACT"}
    assert all(len(history.markers(r["id"], path=hist)) == 3 for r in runs)


def test_fleet_watch_keeps_to_the_connection_limit_too(world, tmp_path):
    import time

    from tamperprobe.fleet import config
    from tamperprobe.fleet.watch import FleetWatch

    upstream = int(world["server"].url.rsplit(":", 1)[1].split("/")[0])
    relay = CountingRelay(upstream, hold=0.02)
    counts: dict[str, int] = {}
    try:
        path = fleet_file(tmp_path, world, f"http://127.0.0.1:{relay.port}/v2/models/model", 6, limit=2, extra="every = 0.3")
        fw = FleetWatch(
            config.load(path), history_path=tmp_path / "h.sqlite", on_run=lambda e, run: counts.update({e.name: counts.get(e.name, 0) + 1})
        )
        worker = threading.Thread(target=fw.run, kwargs={"poll": 0.2}, daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while (len(counts) < 6 or min(counts.values()) < 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        fw.stop()
        worker.join(30)
    finally:
        relay.close()
    assert len(counts) == 6 and min(counts.values()) >= 2, counts
    assert relay.most == 2  # six entries due at once, never more than two connections to their server


def test_claim_many_draws_in_order_in_one_transaction_and_keeps_a_failing_claim_apart(tmp_path):
    """Each claim of a batch sees what those before it took; one whose choose raises writes nothing; the rest are committed."""
    from tamperprobe.served import ledger

    hist = tmp_path / "h.sqlite"

    def take(n):
        def choose(used):
            free = [i for i in range(10) if i not in used.get("marker", set())]
            if len(free) < n:
                raise ValueError("used up")
            return {"marker": free[:n], "decoy": []}

        return choose

    claims = [ledger.Claim("fp", take(4), draw=f"d{i}") for i in range(3)]
    got = ledger.claim_many(claims, path=hist)
    assert got[0] == {"marker": [0, 1, 2, 3], "decoy": []} and got[1] == {"marker": [4, 5, 6, 7], "decoy": []}
    assert isinstance(got[2], ValueError)  # two left, four asked: refused, and only this claim
    assert ledger.drawn("fp", hist)["marker"] == set(range(8))


def test_claims_of_concurrent_sessions_are_committed_before_they_return_and_never_overlap(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from tamperprobe.fleet.records import Claims
    from tamperprobe.served import ledger

    hist = tmp_path / "h.sqlite"
    batches: list[int] = []
    real = ledger.claim_many
    # counted by this test's fingerprint: another test's watch may still be finishing a run in the background
    monkeypatch.setattr(ledger, "claim_many", lambda claims, **k: batches.append(sum(c.fingerprint == "fp" for c in claims)) or real(claims, **k))
    claims = Claims(hist)

    def one(i):
        def choose(used):
            return {"marker": sorted(set(range(64)) - used.get("marker", set()))[:2], "decoy": []}

        got = claims("fp", choose, draw=f"d{i}", path=hist)
        assert set(got["marker"]) <= ledger.drawn("fp", hist)["marker"]  # committed before it returned
        return got["marker"]

    try:
        with ThreadPoolExecutor(16) as pool:
            picks = list(pool.map(one, range(32)))
    finally:
        claims.close()
    flat = [i for p in picks for i in p]
    assert sorted(flat) == list(range(64))  # every marker once: no two sessions got the same
    assert sum(batches) == 32
