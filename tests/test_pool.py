"""Pool draws (issue 10): fresh markers and decoys every run, never sent twice, pairs whole, refused when used up.

Real components: the reference server on 127.0.0.1 running a model that records every input it
is given (so "sent" means "the server received it"), real SQLite history files, real processes
sharing one history, the CLI in-process.
"""

from __future__ import annotations

import json
import sqlite3
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _procs import Forked
from fakes import Scripted, confident_mlp, kserve
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import UsageError
from tamperprobe.fingerprint import load, make_fingerprint, save
from tamperprobe.models import TorchModel
from tamperprobe.served import history, ledger, pool
from tamperprobe.served.clients import make_client
from tamperprobe.served.verify import INCONCLUSIVE, INTACT, TAMPERED, verify
from tamperprobe.server.app import ServerThread
from tamperprobe.signing import Trust

SHAPE = (1, 8, 8)
PAIRS, DECOYS = 6, 12


class Recorder(torch.nn.Module):
    """Runs ``inner`` and keeps every input row it was given: what the server received.

    (The server also runs the model on zeros to learn its output shape; no query is all zeros, and ``sent`` leaves those out.)"""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(x.detach().cpu().numpy().copy())
        return self.inner(x)

    @property
    def sent(self) -> list[np.ndarray]:
        return [row for row in self.seen if row.any()]


def _rows(model, x):
    return np.concatenate([model.logits(x[i : i + 1]) for i in range(len(x))])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    model = confident_mlp(0)
    rng = np.random.default_rng(0)
    x = rng.random((2 * PAIRS, *SHAPE)).astype(np.float32)
    dx = rng.random((DECOYS, *SHAPE)).astype(np.float32)
    groups = np.repeat(np.arange(PAIRS), 2)
    fp = make_fingerprint(
        x, _rows(model, x), InputSpec(SHAPE), {"method": "boundary"}, "test", output_spec="logits", groups=groups,
        decoy_inputs=dx, decoy_logits=_rows(model, dx),
    )  # fmt: skip
    return {"dir": d, "model": model, "fp": fp, "fp_path": save(fp, d / "fp.tpf")}


def _recording_server(world):
    rec = Recorder(world["model"].module)
    return rec, ServerThread(TorchModel(rec, "rec"), name="m", input_shape=SHAPE)


def _which(fp, seen):
    """(kind, index) of every received input that is one of the fingerprint's markers or decoys."""
    out = []
    for row in seen:
        for kind in ("marker", "decoy"):
            hits = np.flatnonzero((fp.queries(kind)[0] == row).reshape(len(fp.queries(kind)[0]), -1).all(axis=1))
            out += [(kind, int(i)) for i in hits]
    return out


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- the served side, end to end


def test_no_marker_is_sent_twice_across_runs_and_a_used_up_pool_is_refused(world, tmp_path):
    fp, hist = world["fp"], tmp_path / "h.sqlite"
    rec, srv = _recording_server(world)
    with srv:
        common = ["--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--history", hist, "--per-run", "2"]
        w = run("watch", world["fp_path"], *common, "--every", "0s", "--count", "4")
        v = run("verify", world["fp_path"], *common)
        received, rows = _which(fp, rec.seen), len(rec.sent)
        v2 = run("verify", world["fp_path"], *common)
        again = _which(fp, rec.seen)
        last = run("verify", world["fp_path"], *common)
        after = _which(fp, rec.seen)
    assert w.exit_code == 0 and w.stdout.count("INTACT: all 2 markers and 2 decoys match") == 4, (w.stdout, w.stderr)
    assert "pool of fingerprint" in w.stderr and "6 runs of 2 markers + 2 decoys left" in w.stderr
    assert "running out" in w.stderr  # 6 runs in all: warned from 3 left on
    assert v.exit_code == 0 and "1 more runs like this one" in v.stdout
    # what the server received: 5 runs x (1 pair + 2 decoys), every one a fingerprint query, none twice
    assert len(received) == 5 * 4 == len(set(received)) == rows
    assert v2.exit_code == 0 and len(again) == 24 == len(set(again))
    # the pool is used up: refused in one line, exit 2, nothing sent
    assert last.exit_code == 2 and after == again, last.stdout
    (line,) = last.stderr.strip().splitlines()
    assert line.startswith(f"error: the pool of fingerprint {fp.id} is used up: 0 of its 12 markers are unused and this run needs 2")
    assert "nothing was sent" in line and "--allow-repeat" in line
    # the history agrees with the server: each run's markers are whole pairs, nothing repeats, all 6 pairs and 12 decoys used
    runs = sorted(history.runs(hist, limit=None), key=lambda r: r["id"])
    assert [(r["pool"], r["markers"], r["decoys"], r["repeated"]) for r in runs] == [("fresh", 2, 2, 0)] * 6
    sent = [(m["kind"], m["index"]) for r in runs for m in history.markers(r["id"], hist)]
    assert sorted(sent) == sorted(again)
    for r in runs:
        idx = [m["index"] for m in history.markers(r["id"], hist) if m["kind"] == "marker"]
        assert len(idx) == 2 and idx[0] // 2 == idx[1] // 2 and idx[0] != idx[1]  # both halves of one pair
    (usage,) = ledger.pool_usage(hist)
    assert (usage["fingerprint"], usage["markers"], usage["decoys"], usage["draws"]) == (fp.id, 12, 12, 6)
    h = run("history", "--pool", "--history", hist)
    assert h.exit_code == 0 and fp.id in h.stdout
    shown = json.loads(run("inspect", world["fp_path"], "--history", hist, "--json").stdout)["pool_usage"]
    assert (shown["used_markers"], shown["used_decoys"], shown["runs_left"]) == (12, 12, 0)


def test_a_watch_stops_with_exit_2_when_the_pool_runs_out(world, tmp_path):
    with ServerThread(world["model"], name="m", input_shape=SHAPE) as srv:
        r = run("watch", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--history", tmp_path / "h.sqlite")
    # default: 10 markers (5 pairs) and 10 decoys a run from 12 markers / 12 decoys: one run, then the pool is used up
    assert r.exit_code == 2 and r.stdout.count("INTACT: all 10 markers and 10 decoys match") == 1, (r.stdout, r.stderr)
    assert "error: watch stopped after run 1: the pool of fingerprint" in r.stderr and "used up" in r.stderr


def test_no_history_is_refused_unless_repeats_are_allowed(world, tmp_path):
    rec, srv = _recording_server(world)
    with srv:
        common = [world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--retries", "0", "--no-history", "--per-run", "2"]
        refused = run("verify", *common)
        w = run("watch", *common, "--every", "0s", "--count", "1")
        sent_before = len(rec.sent)
        allowed = run("verify", *common, "--allow-repeat", "--decoys", "0")
    assert refused.exit_code == 2 and w.exit_code == 2 and sent_before == 0
    for r in (refused, w):
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("error: without a history (--no-history) nothing records which markers were sent") and "--allow-repeat" in line
    assert allowed.exit_code == 0 and "--allow-repeat without a history" in allowed.stdout and len(rec.sent) == 2


def test_allow_repeat_refills_from_used_markers_and_says_so_on_every_run(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    with ServerThread(world["model"], name="m", input_shape=SHAPE) as srv:
        args = ["--endpoint", srv.url, "--model-name", "m", "--history", hist, "--per-run", "4", "--decoys", "0", "--every", "0s"]
        r = run("watch", world["fp_path"], *args, "--count", "4", "--allow-repeat")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.stderr.count("--allow-repeat") == 4  # warned on every run
    runs = sorted(history.runs(hist, limit=None), key=lambda row: row["id"])
    # 6 pairs, 2 a run: fresh, fresh, fresh, then a run made only of pairs sent before
    assert [(row["pool"], row["repeated"]) for row in runs] == [("repeat", 0), ("repeat", 0), ("repeat", 0), ("repeat", 4)]
    assert all("--allow-repeat" in row["notes"] for row in runs)


def test_a_broken_history_refuses_fresh_draws_before_anything_is_sent(world, tmp_path):
    broken = tmp_path / "history-dir"
    broken.mkdir()  # a folder where the database should be
    rec, srv = _recording_server(world)
    with srv:
        r = run("verify", world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--history", broken, "--per-run", "2")
    assert r.exit_code == 2 and rec.sent == [], (r.stdout, r.stderr)
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: cannot draw fresh markers: cannot open history") and line.endswith("nothing was sent")


# --------------------------------------------------------------------------- the draw itself


def test_pairs_are_drawn_whole_and_per_run_must_be_whole_pairs(world, tmp_path):
    fp = world["fp"]
    with pytest.raises(UsageError, match="not a whole number of pairs"):
        pool.plan(fp, per_run=3)
    with pytest.raises(UsageError, match="more than the 12 markers"):
        pool.plan(fp, per_run=14)
    with pytest.raises(UsageError, match="holds 12"):
        pool.plan(fp, per_run=8, decoys=2.0)
    p = pool.plan(fp, per_run=4, decoys=0.5)
    assert (p.markers, p.decoys, p.unit) == (4, 2, 2)
    seen: list[int] = []
    for _ in range(3):
        d = pool.draw(fp, p, path=tmp_path / "h.sqlite")
        assert len(d.markers) == 4 and all(i ^ 1 in d.markers for i in d.markers)  # every marker's pair partner too (groups 2k, 2k+1)
        seen += d.markers
    assert sorted(seen) == list(range(12))  # three runs of two pairs: the whole pool, nothing twice
    with pytest.raises(pool.PoolExhausted):
        pool.draw(fp, p, path=tmp_path / "h.sqlite")


def test_a_draw_is_recorded_before_sending_so_an_interrupted_run_wastes_rather_than_repeats(world, tmp_path):
    fp, hist = world["fp"], tmp_path / "h.sqlite"
    p = pool.plan(fp, per_run=2, decoys=1)
    lost = pool.draw(fp, p, path=hist)  # ... and the process dies before sending anything
    assert ledger.drawn(fp.id, hist) == {"marker": set(lost.markers), "decoy": set(lost.decoys)}
    later = [pool.draw(fp, p, path=hist) for _ in range(5)]
    assert not {i for d in later for i in d.markers} & set(lost.markers)
    assert not {j for d in later for j in d.decoys} & set(lost.decoys)
    assert pool.status(fp, p, hist).runs_left == 0 and later[-1].runs_left == 0 and later[0].runs_left == 4


def test_decoys_are_shuffled_in_among_the_markers(world, tmp_path):
    fp = world["fp"]
    p = pool.plan(fp, per_run=2, decoys=1)
    first_kinds, positions = set(), set()
    for _ in range(40):  # no ledger needed to look at the order: drawn without a record
        d = pool.draw(fp, p, record=False, allow_repeat=True)
        kinds = [k for k, _ in d.items()]
        assert sorted(kinds) == ["decoy", "decoy", "marker", "marker"]
        first_kinds.add(kinds[0])
        positions.add(tuple(kinds))
    # a fixed layout would give one pattern; 40 CSPRNG shuffles of 2+2 miss a first-place kind with p = 2^-39
    assert first_kinds == {"marker", "decoy"} and len(positions) >= 3


def _draw_until_used_up(fp, plan, hist, go, out) -> None:
    """In a process of its own: wait for ``go``, then draw from ``hist`` until the pool is used up; the draws into ``out``."""
    while not go.exists():
        time.sleep(0.001)
    got = []
    while True:
        try:
            got.append(list(pool.draw(fp, plan, path=hist).markers))
            time.sleep(0.002)
        except pool.PoolExhausted:
            break
    out.write_text(json.dumps(got))


def test_two_processes_sharing_a_history_never_draw_the_same_marker(tmp_path):
    """Two processes (forked from this one, tests/_procs.py: SQLite's locks between processes are the point, a fresh
    interpreter is not) race to draw from one history."""
    n_pairs = 150
    x = np.random.default_rng(1).random((2 * n_pairs, *SHAPE)).astype(np.float32)
    z = np.random.default_rng(2).normal(size=(2 * n_pairs, 10)).astype(np.float32)
    fp = make_fingerprint(x, z, InputSpec(SHAPE), {"method": "boundary"}, "t", groups=np.repeat(np.arange(n_pairs), 2))
    fp_path, hist, go = save(fp, tmp_path / "fp.tpf", sign_key=None), tmp_path / "h.sqlite", tmp_path / "go"
    fp = load(fp_path, trust=Trust(allow_unsigned=True))
    history.runs(hist)  # the schema exists before the race starts
    outs = [tmp_path / f"drawn{i}.json" for i in range(2)]
    procs = [Forked(_draw_until_used_up, fp, pool.plan(fp, per_run=2), hist, go, out, log=tmp_path / f"log{i}") for i, out in enumerate(outs)]
    go.write_text("go")
    for i, p in enumerate(procs):
        try:
            assert p.wait(timeout=120) == 0, (tmp_path / f"log{i}").read_text()
        finally:
            p.kill()
    results = [json.loads(out.read_text()) for out in outs]
    drawn = [i for draws in results for d in draws for i in d]
    assert sorted(drawn) == list(range(2 * n_pairs))  # every marker drawn exactly once between the two
    assert len(results[0]) + len(results[1]) == n_pairs and all(len(d) == 2 and d[0] // 2 == d[1] // 2 for r in results for d in r)
    assert min(len(r) for r in results) > 0  # both drew: the draws did interleave (each pauses 2 ms between draws)


# --------------------------------------------------------------------------- decoys compared like markers


def test_a_changed_decoy_is_evidence_and_reported_as_a_decoy(world, tmp_path):
    fp = world["fp"]
    wrong = fp.decoy_logits.copy()
    wrong[:, 0] += 100.0  # the fingerprint now expects other answers for every decoy
    altered = make_fingerprint(
        fp.inputs, fp.logits, fp.input_spec, fp.generator, fp.model_digest, output_spec="logits", groups=fp.groups,
        decoy_inputs=fp.decoy_inputs, decoy_logits=wrong,
    )  # fmt: skip
    p = pool.plan(altered, per_run=2, decoys=1)
    with ServerThread(world["model"], name="m", input_shape=SHAPE) as srv:
        client = make_client("kserve", srv.url, model_name="m", retries=0, classes=10)
        report = verify(altered, client, draw=pool.draw(altered, p, path=tmp_path / "h.sqlite"))
    assert report.verdict == TAMPERED and report.headline() == "TAMPERED: 0 of 2 markers and 2 of 2 decoys changed under logits"
    assert [(m.kind, m.ok) for m in report.markers] == [("marker", True)] * 2 + [("decoy", False)] * 2
    rid = history.record(report, path=tmp_path / "h.sqlite")
    rows = history.markers(rid, tmp_path / "h.sqlite")
    assert [(r["kind"], r["status"]) for r in rows] == [("marker", "match")] * 2 + [("decoy", "MISMATCH")] * 2


def test_a_decoy_without_an_answer_makes_the_run_inconclusive(world, tmp_path):
    fp = world["fp"]
    answered = kserve(world["model"].logits)

    def respond(req, out):  # answers markers, fails decoys (the server cannot know which is which: we can)
        if req.path.endswith("/infer"):
            row = np.asarray(req.json()["inputs"][0]["data"], np.float32).reshape(SHAPE)
            if (fp.decoy_inputs == row).reshape(DECOYS, -1).all(axis=1).any():
                from fakes import reply

                return reply(out, 500, {"error": "down"})
        answered(req, out)

    with Scripted(respond) as srv:
        client = make_client("kserve", srv.url, model_name="m", retries=0, classes=10)
        report = verify(fp, client, draw=pool.draw(fp, pool.plan(fp, per_run=2, decoys=0.5), path=tmp_path / "h.sqlite"))
    assert report.verdict == INCONCLUSIVE and report.first_failure().startswith("decoy ")
    assert report.headline() == "INCONCLUSIVE: 1 of 3 queries (2 markers, 1 decoys) got no usable answer (0 mismatched)"


def test_verify_without_a_draw_sends_everything_and_says_so_for_an_endpoint(world):
    with ServerThread(world["model"], name="m", input_shape=SHAPE) as srv:
        report = verify(world["fp"], make_client("kserve", srv.url, model_name="m", retries=0))
    assert report.verdict == INTACT and report.pool == "all" and report.marker_count == 12 and report.decoy_count == 0
    assert any("every marker of the fingerprint was sent" in n for n in report.notes)


# --------------------------------------------------------------------------- spread and delay


def test_delay_keeps_requests_apart_and_spread_scatters_them_within_its_window(world):
    x = world["fp"].inputs[:6]
    spec = "logits"
    from tamperprobe.outputs import OutputSpec

    with Scripted(kserve(world["model"].logits)) as srv:
        delayed = make_client("kserve", srv.url, model_name="m", retries=0, delay=0.15)
        delayed.query(x[:4], OutputSpec.parse(spec))
        arrivals = [r.received for r in srv.requests if r.path.endswith("/infer")]
        gaps = np.diff(arrivals)
        assert len(gaps) == 3 and gaps.min() >= 0.15, gaps  # a fixed pause after each request
        srv.requests.clear()
        spread = make_client("kserve", srv.url, model_name="m", retries=0, spread=1.0)
        assert spread.planned_pauses(6) == 1.0 and delayed.planned_pauses(4) == pytest.approx(0.45)
        t0 = time.monotonic()
        result = spread.query(x, OutputSpec.parse(spec))
        took = time.monotonic() - t0
        arrivals = np.array([r.received for r in srv.requests if r.path.endswith("/infer")])
    assert all(not hasattr(a, "reason") for a in result.answers)
    assert len(arrivals) == 6 and arrivals.min() >= t0 and arrivals.max() <= t0 + 1.0 + 0.5 and took <= 1.0 + 1.0
    assert arrivals.max() - arrivals.min() > 0.05  # not one burst (uniform times: p < 1e-5 of falling within 50 ms)


def test_a_spread_longer_than_the_deadline_is_a_usage_error_before_any_draw(world, tmp_path):
    hist = tmp_path / "h.sqlite"
    with ServerThread(world["model"], name="m", input_shape=SHAPE) as srv:
        common = [world["fp_path"], "--endpoint", srv.url, "--model-name", "m", "--history", hist, "--per-run", "2"]
        r = run("verify", *common, "--spread", "10s", "--deadline", "5s")
        w = run("watch", *common, "--delay", "2", "--deadline", "5s", "--every", "0s", "--count", "1")  # 3 pauses of 2 s
    for res in (r, w):
        assert res.exit_code == 2, (res.stdout, res.stderr)
        (line,) = res.stderr.strip().splitlines()
        assert "not within the --deadline of 5 s" in line
    assert ledger.drawn(world["fp"].id, hist) == {}  # nothing drawn, nothing burnt


def test_a_spread_run_that_overruns_its_deadline_fails_closed(world, tmp_path):
    slow = kserve(world["model"].logits)

    def respond(req, out):
        if req.path.endswith("/infer"):
            time.sleep(0.3)
        slow(req, out)

    fp = world["fp"]
    with Scripted(respond) as srv:  # five requests of 0.3 s each, spread over 0.5 s: they cannot end within 0.75 s
        client = make_client("kserve", srv.url, model_name="m", retries=0, spread=0.5, deadline=0.75, classes=10)
        report = verify(fp, client, draw=pool.draw(fp, pool.plan(fp, per_run=4, decoys=1), path=tmp_path / "h.sqlite"))
    assert report.verdict == INCONCLUSIVE and "deadline of 0.75 s reached" in report.summary()


# --------------------------------------------------------------------------- the fingerprint and the history file


def test_decoys_are_signed_with_the_rest(world, tmp_path):
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    from tamperprobe.errors import FingerprintFormatError

    back = load(world["fp_path"])
    assert back.decoys == DECOYS and np.array_equal(back.decoy_logits, world["fp"].decoy_logits) and back.id == world["fp"].id
    raw = world["fp_path"].read_bytes()
    (n,) = np.frombuffer(raw[:8], "<u8")
    meta = json.loads(raw[8 : 8 + int(n)])["__metadata__"]
    tensors = st_load(raw)
    tensors["decoy_logits"] = tensors["decoy_logits"] + np.float32(1.0)  # the operator's wish: other expected answers
    (tmp_path / "forged.tpf").write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(FingerprintFormatError, match="do not match the recorded checksum"):
        load(tmp_path / "forged.tpf")


def test_create_fingerprint_stores_decoys_that_fed_no_marker(digits, trained_cnn):
    from tamperprobe.owner.generate import create_fingerprint

    train, _ = digits
    trained_cnn = TorchModel(trained_cnn, "cnn")
    fp = create_fingerprint(trained_cnn, train, method="natural", select="random", size=6, bag=12, seed=0, per_run=2)
    assert fp.decoys == 6 and fp.per_run == 2 and fp.decoy_logits.shape == (6, 10)
    assert np.allclose(fp.decoy_logits, trained_cnn.logits(fp.decoy_inputs), atol=1e-4)
    seeds = {r.tobytes() for r in fp.seeds.reshape(len(fp), -1)}
    assert not any(r.tobytes() in seeds for r in fp.decoy_inputs.reshape(fp.decoys, -1))  # no decoy is a marker's source
    assert pool.plan(fp) == pool.Plan(2, 2, 1)
    none = create_fingerprint(trained_cnn, train, method="natural", select="random", size=6, bag=12, seed=0, decoys=0)
    assert none.decoys == 0 and pool.plan(none).decoys == 0
    with pytest.raises(UsageError, match="natural inputs that fed no marker"):
        create_fingerprint(trained_cnn, train, method="natural", select="random", size=6, bag=12, seed=0, decoys=10**6)


_V2_SCHEMA = """
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, target TEXT NOT NULL, protocol TEXT,
    fingerprint TEXT NOT NULL, output_spec TEXT NOT NULL, verdict TEXT NOT NULL, markers INTEGER NOT NULL,
    mismatched INTEGER NOT NULL, failed INTEGER NOT NULL, seconds REAL NOT NULL, tolerance REAL, summary TEXT,
    signer TEXT, notes TEXT);
CREATE TABLE markers (run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE, idx INTEGER NOT NULL, status TEXT NOT NULL,
    expected TEXT, observed TEXT, detail TEXT, latency REAL, PRIMARY KEY (run_id, idx));
CREATE INDEX runs_time ON runs(time);
INSERT INTO runs VALUES (1, '2025-01-01T00:00:00+00:00', 'kserve:http://old', 'kserve', 'abcd', 'top1', 'TAMPERED', 2, 1, 0, 0.1,
    3e-5, 'TAMPERED', 'k3y', NULL);
INSERT INTO markers VALUES (1, 0, 'match', '[3]', '[3]', '', 0.01), (1, 1, 'MISMATCH', '[4]', '[5]', 'label', 0.02);
PRAGMA user_version = 2;
"""


def test_a_version_2_history_is_upgraded_in_place_keeping_its_rows(world, tmp_path):
    path = tmp_path / "v2.sqlite"
    with sqlite3.connect(path) as con:
        con.executescript(_V2_SCHEMA)
    fp = world["fp"]
    d = pool.draw(fp, pool.plan(fp, per_run=2, decoys=1), path=path)  # the first write upgrades the file
    with ServerThread(world["model"], name="m", input_shape=SHAPE) as srv:
        report = verify(fp, make_client("kserve", srv.url, model_name="m", retries=0), draw=d)
    rid = history.record(report, path=path)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION == 4
    old, new = sorted(history.runs(path), key=lambda r: r["id"])
    assert (old["verdict"], old["signer"], old["markers"], old["decoys"], old["pool"], old["draw"]) == ("TAMPERED", "k3y", 2, None, None, None)
    assert [(m["kind"], m["index"], m["status"], m["observed"]) for m in history.markers(1, path)] == [
        ("marker", 0, "match", "[3]"),
        ("marker", 1, "MISMATCH", "[5]"),
    ]
    assert (new["id"], new["pool"], new["markers"], new["decoys"], new["draw"]) == (rid, "fresh", 2, 2, d.draw_id)
    kinds = [(m["kind"], m["index"]) for m in history.markers(rid, path)]
    assert kinds == [("marker", i) for i in d.markers] + [("decoy", j) for j in d.decoys]  # a decoy may share a marker's index
    assert ledger.drawn(fp.id, path) == {"marker": set(d.markers), "decoy": set(d.decoys)}


def test_requests_do_not_name_tamperprobe(world, tmp_path):
    """A name of our own in any header would tell the operator which requests to route to the original model."""
    seen: list[dict[str, str]] = []
    answered = kserve(world["model"].logits)

    def respond(req, out):
        seen.append(dict(req.headers))
        answered(req, out)

    with Scripted(respond) as srv:
        client = make_client("kserve", srv.url, model_name="m", retries=0, classes=10)
        report = verify(world["fp"], client, draw=pool.draw(world["fp"], pool.plan(world["fp"], per_run=2, decoys=0), path=tmp_path / "h.sqlite"))
    assert report.verdict == INTACT and seen
    assert all("tamperprobe" not in f"{k}: {v}".lower() for h in seen for k, v in h.items())
