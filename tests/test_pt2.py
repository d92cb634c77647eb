"""``.pt2`` archives from a suspect party cannot act: torch reads only an archive rebuilt from approved parts.

The two archives of issue 18 pass the archive check on the main branch before this change and run code in
``torch.export.load``: one holds two entries of one name (Python's ``zipfile`` reads the last, torch the first),
one adds a second program ``weight_x`` whose legacy weights file ``data/weights/weight_x.pt`` the check skipped by
its prefix while torch unpickles it with a full-unpickling fallback. Both are built here, shown to run code when
torch reads them directly, and refused (exit 2, one line) by ``verify --model``. A fuzzer mutates valid and
malicious archives: every result is refused with ``ModelLoadError`` or loads with the original's exact logits,
and no payload ever runs.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tamperprobe import zoo
from tamperprobe._pt2 import Pt2Refused, approved_parts
from tamperprobe._strictzip import ArchiveRefused, read_archive
from tamperprobe.cli.app import app
from tamperprobe.data import InputSpec
from tamperprobe.errors import ModelLoadError
from tamperprobe.fingerprint import make_fingerprint, save
from tamperprobe.models import load_model, save_model

SHAPE = (1, 8, 8)
X = np.random.default_rng(3).random((5, *SHAPE), dtype=np.float32)


class _MakeDir:
    """Unpickling this creates a folder: the visible proof that loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _pickled(marker) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(_MakeDir(marker), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid archive: its path, its entries in file order, the root folder, and the model's logits on X."""
    d = tmp_path_factory.mktemp("pt2")
    path = save_model(zoo.build("mlp", SHAPE).eval(), d / "good.pt2", X)
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    return path, entries, entries[0][0].split("/", 1)[0] + "/", load_model(path).logits(X)


def raw_zip(entries, *, prefix=b"", gap=b"", comment=b"", entry_comment=b"", cd_name=None, local_crc=None, embed=False) -> bytes:
    """A stored zip built byte by byte, so that it can hold what ``zipfile`` would not write.

    ``gap`` follows the first entry, ``cd_name`` renames entries in the central directory only, ``local_crc`` puts
    another CRC in the first local header, ``embed`` hides the last entry inside the one before it (overlap).
    """
    out, cd = bytearray(prefix), bytearray()
    records = []
    for name, data in entries:
        name = name.encode() if isinstance(name, str) else name
        records.append((name, data, zlib.crc32(data)))
    if embed:  # the last local record becomes the tail of the previous entry's data
        name, data, crc = records.pop()
        inner = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(name), 0) + name + data
        pname, pdata, _ = records.pop()
        records.append((pname, pdata + inner, zlib.crc32(pdata + inner)))
        embedded = (name, data, crc, len(pdata) + 30 + len(pname))
    for k, (name, data, crc) in enumerate(records):
        off = len(out)
        lcrc = local_crc if (k == 0 and local_crc is not None) else crc
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, lcrc, len(data), len(data), len(name), 0) + name + data
        if k == 0:
            out += gap
        ec = entry_comment if k == 0 else b""
        cname = cd_name(name) if cd_name else name
        cd += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(cname), 0, len(ec), 0, 0, 0, off
        )
        cd += cname + ec
    if embed:
        name, data, crc, delta = embedded
        cd += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(name), 0, 0, 0, 0, 0, off + delta
        )
        cd += name
    count = len(records) + (1 if embed else 0)
    cd_off = len(out)
    out += cd
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(cd), cd_off, len(comment)) + comment
    return bytes(out)


# --------------------------------------------------------------------------- the two archives of issue 18


def dup_archive(good, marker) -> bytes:
    """Two weights configs of one name: torch reads the first (weights pickled), zipfile the last (plain)."""
    _, entries, root, _ = good
    cfg_name = root + "data/weights/model_weights_config.json"
    plain = dict(entries)[cfg_name]
    evil = json.loads(plain)
    first = next(iter(evil["config"]))
    evil["config"][first]["use_pickle"] = True
    payload_name = root + "data/weights/" + evil["config"][first]["path_name"]
    out = []
    for name, data in entries:
        if name == cfg_name:
            out += [(name, json.dumps(evil).encode()), (name, data)]
        else:
            out.append((name, _pickled(marker) if name == payload_name else data))
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, data in out:
            zf.writestr(name, data)
    return buf.getvalue()


def legacy_archive(good, marker) -> bytes:
    """A second program ``weight_x`` whose legacy weights file is named like a raw weight payload."""
    _, entries, root, _ = good
    parts = dict(entries)
    extra = [
        (root + "models/weight_x.json", parts[root + "models/model.json"]),
        (root + "data/weights/weight_x.pt", _pickled(marker)),
        (root + "data/sample_inputs/weight_x.pt", parts[root + "data/sample_inputs/model.pt"]),
        (root + "data/constants/weight_x_constants_config.json", parts[root + "data/constants/model_constants_config.json"]),
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in [*entries, *extra]:
            zf.writestr(name, data)
    return buf.getvalue()


ATTACKS = {"duplicate-name": dup_archive, "legacy-weights-name": legacy_archive}


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_attack_archive_looks_plain_to_zipfile_and_runs_code_in_torch(good, tmp_path, kind):
    """What the check on main read (zipfile: no pickled config, only weight_* payloads) is not what torch ran."""
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / f"{kind}.pt2"
    evil.write_bytes(ATTACKS[kind](good, marker))
    with zipfile.ZipFile(evil) as zf:
        configs = [json.loads(zf.read(n))["config"] for n in zf.namelist() if n.endswith("_weights_config.json")]
        leaves = {n.rsplit("/", 1)[1] for n in zf.namelist() if "/data/weights/" in n and not n.endswith(".json")}
    assert all(meta["use_pickle"] is False for cfg in configs for meta in cfg.values())
    assert all(leaf.startswith("weight") for leaf in leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.export.load(str(evil))
        except Exception:
            pass
    assert marker.exists()


@pytest.fixture(scope="module")
def fp_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    x = np.random.default_rng(0).random((4, *SHAPE)).astype(np.float32)
    logits = np.random.default_rng(1).normal(size=(4, 10)).astype(np.float32)
    return save(make_fingerprint(x, logits, InputSpec(SHAPE), {"method": "natural"}, "test", output_spec="logits"), d / "fp.tpf")


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_attack_archive_is_refused_by_verify_with_one_line_and_exit_2(good, fp_file, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"{kind}.pt2"
    evil.write_bytes(ATTACKS[kind](good, marker))
    r = CliRunner().invoke(app, ["verify", str(fp_file), "--model", str(evil), "--no-history"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "refusing a torch.export archive" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "refusing" in line]) == 1
    assert not marker.exists()


# --------------------------------------------------------------------------- zip layouts two readers could resolve differently


def _rename(entries, old_suffix, new_name):
    return [(new_name if n.endswith(old_suffix) else n, d) for n, d in entries]


LAYOUTS = {
    "duplicate": lambda e, r: raw_zip([*e, e[0]]),
    "duplicate-ignoring-case": lambda e, r: raw_zip([*e, (e[0][0].upper(), e[0][1])]),
    "dot-dot": lambda e, r: raw_zip([*e, (r + "data/../models/model.json", b"{}")]),
    "dot-slash": lambda e, r: raw_zip(_rename(e, "models/model.json", r + "./models/model.json")),
    "backslash": lambda e, r: raw_zip(_rename(e, "models/model.json", r + "models\\model.json")),
    "absolute": lambda e, r: raw_zip([(("/" + n) if k == 0 else n, d) for k, (n, d) in enumerate(e)]),
    "empty-segment": lambda e, r: raw_zip(_rename(e, "models/model.json", r + "models//model.json")),
    "directory-entry": lambda e, r: raw_zip([*e, (r + "models/", b"")]),
    "bytes-before": lambda e, r: raw_zip(e, prefix=b"MZ" + b"\0" * 30),
    "bytes-between": lambda e, r: raw_zip(e, gap=b"PK\x03\x04 hidden"),
    "archive-comment": lambda e, r: raw_zip(e, comment=b"PK\x01\x02 hidden entry"),
    "entry-comment": lambda e, r: raw_zip(e, entry_comment=b"note"),
    "central-name-differs": lambda e, r: raw_zip(e, cd_name=lambda n: n.replace(b"weight_0", b"weight_9")),
    "local-crc-differs": lambda e, r: raw_zip(e, local_crc=1234),
    "overlapping-entries": lambda e, r: raw_zip(e, embed=True),
    "bytes-after-end": lambda e, r: raw_zip(e) + b"\0",
    "non-ascii-name": lambda e, r: raw_zip([*e, ((r + "models/m\u00e9.json").encode(), b"{}")]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ambiguous_zip_layouts_are_refused(good, tmp_path, layout):
    path, entries, root, _ = good
    data = LAYOUTS[layout](entries, root)
    with pytest.raises(ArchiveRefused):
        read_archive(data)
    p = tmp_path / "x.pt2"
    p.write_bytes(data)
    with pytest.raises(Pt2Refused, match="refusing a torch.export archive that"):
        load_model(p)


def test_the_raw_builder_makes_archives_that_load(good, tmp_path):
    """The layouts above differ from a loadable archive only by what they name (the builder itself is sound)."""
    path, entries, _, logits = good
    p = tmp_path / "rebuilt.pt2"
    p.write_bytes(raw_zip(entries))
    np.testing.assert_array_equal(load_model(p).logits(X), logits)


@pytest.mark.parametrize("how", ["stored", "deflated", "zip64"])
def test_strict_reader_agrees_with_zipfile_on_plain_archives(how):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    want = {f"r/{k}": rng.bytes(int(rng.integers(0, 3000))) for k in range(5)}
    method = zipfile.ZIP_DEFLATED if how == "deflated" else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in want.items():
            with zf.open(name, "w", force_zip64=how == "zip64") as f:
                f.write(data)
    assert read_archive(buf.getvalue()) == want


def test_strict_reader_reads_torch_written_archives(good):
    path, entries, _, _ = good
    assert read_archive(Path(path).read_bytes()) == dict(entries)


# --------------------------------------------------------------------------- parts: only what torch.export.save writes for one program


def _with_program(good, change) -> bytes:
    _, entries, root, _ = good
    out = []
    for name, data in entries:
        if name == root + "models/model.json":
            doc = json.loads(data)
            change(doc)
            data = json.dumps(doc).encode()
        out.append((name, data))
    return raw_zip(out)


@pytest.mark.parametrize(
    "target, why",
    [
        ("torch.ops.aten.from_file.default", "calls aten.from_file"),
        ("torch.ops.aten.save.default", "calls aten.save"),
        ("torch.ops.debugprims.load_tensor.default", "outside the aten set"),
        ("torch.ops.higher_order.triton_kernel_wrapper_mutation", "outside the aten set"),
        ("torch.ops.load_library", "outside the aten set"),
    ],
)
def test_programs_calling_file_or_foreign_operators_are_refused(good, target, why):
    def change(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = target

    with pytest.raises(Pt2Refused, match=why):
        approved_parts("m.pt2", _with_program(good, change))


def test_rebuilt_archive_holds_only_approved_parts_and_fresh_sample_inputs(good):
    _, entries, root, _ = good
    parts = approved_parts("m.pt2", raw_zip(entries))
    assert set(parts) == {
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
        *(f"data/weights/weight_{k}" for k in range(6)),
    }
    assert all(parts[n] == dict(entries)[root + n] for n in parts if n != "data/sample_inputs/model.pt")


@pytest.mark.parametrize(
    "name, data, why",
    [
        ("extra/notes.txt", b"hi", "contains extra/notes.txt"),
        ("data/weights/weight_99", b"\0" * 4, "contains data/weights/weight_99"),
        ("data/aotinductor/model/x.so", b"\x7fELF", "contains data/aotinductor"),
        ("archive_version", b"1", "says archive_version"),
    ],
)
def test_parts_beyond_one_plain_program_are_refused(good, name, data, why):
    _, entries, root, _ = good
    kept = [(n, d) for n, d in entries if n != root + name]
    with pytest.raises(Pt2Refused, match=why):
        approved_parts("m.pt2", raw_zip([*kept, (root + name, data)]))


# --------------------------------------------------------------------------- fuzzing

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALE = max(float(os.environ.get("TAMPERPROBE_FUZZ_SCALE", "1")), 0.01)
FUZZ = settings(max_examples=int(40 * SCALE), deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _loads_or_refused(good, data: bytes, folder: Path, marker: Path) -> str:
    """The property: refused with ModelLoadError, or loaded with the original's exact logits; never the payload."""
    p = folder / "fuzz.pt2"
    p.write_bytes(data)
    try:
        model = load_model(p)
    except ModelLoadError:
        outcome = "refused"
    else:
        np.testing.assert_array_equal(model.logits(X), good[3])
        outcome = "loaded"
    assert not marker.exists(), "a payload ran"
    event(outcome)
    return outcome


@pytest.fixture(scope="module")
def seeds(good, tmp_path_factory):
    """A valid archive and the two attack archives (their payloads make a folder if they ever run)."""
    d = tmp_path_factory.mktemp("seeds")
    marker = d / "pwned"
    return marker, [Path(good[0]).read_bytes(), dup_archive(good, marker), legacy_archive(good, marker)]


_byte_edits = st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=4)),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(seed=st.integers(0, 2), edits=_byte_edits)
def test_fuzz_archive_bytes(good, seeds, tmp_path_factory, seed, edits):
    marker, archives = seeds
    data = bytearray(archives[seed])
    for op, where, blob in edits:
        at = int(where * len(data))
        if op == "set":
            data[at : at + len(blob)] = blob
        elif op == "insert":
            data[at:at] = blob
        elif op == "delete":
            del data[at : at + len(blob)]
        else:
            del data[max(at, 1) :]
    outcome = _loads_or_refused(good, bytes(data), tmp_path_factory.mktemp("f"), marker)
    assert seed == 0 or outcome == "refused"


_entry_edits = st.lists(
    st.tuples(
        st.sampled_from(["duplicate", "drop", "swap", "rename", "add", "deflate", "evil-duplicate"]),
        st.integers(0, 1000),
        st.sampled_from(["./", "../", "\\", "/", "//", "X", "models/", "data/weights/weight_", "extra/", ""]),
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(edits=_entry_edits, writer=st.sampled_from(["zipfile", "raw"]))
def test_fuzz_archive_entries(good, seeds, tmp_path_factory, edits, writer):
    marker, _ = seeds
    entries = [(n, d, zipfile.ZIP_STORED) for n, d in good[1]]
    for op, k, text in edits:
        i = k % len(entries)
        name, data, method = entries[i]
        if op == "duplicate":
            entries.insert(k % (len(entries) + 1), entries[i])
        elif op == "drop":
            entries.pop(i)
        elif op == "swap":
            j = (k // 7) % len(entries)
            entries[i], entries[j] = entries[j], entries[i]
        elif op == "rename":
            cut = len(good[2]) + (k % max(1, len(name) - len(good[2])))
            entries[i] = (name[:cut] + text + name[cut:], data, method)
        elif op == "add":
            entries.append((good[2] + text + "x", b"x", zipfile.ZIP_STORED))
        elif op == "deflate":
            entries[i] = (name, data, zipfile.ZIP_DEFLATED)
        else:
            entries.insert(0, (name, _pickled(marker), zipfile.ZIP_STORED))
        if not entries:
            entries = [(good[2] + "x", b"", zipfile.ZIP_STORED)]
    if writer == "raw" and all(m == zipfile.ZIP_STORED for _, _, m in entries):
        data = raw_zip([(n, d) for n, d, _ in entries])
    else:
        buf = io.BytesIO()
        with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
            warnings.simplefilter("ignore")
            for n, d, m in entries:
                zf.writestr(n, d, compress_type=m)
        data = buf.getvalue()
    _loads_or_refused(good, data, tmp_path_factory.mktemp("f"), marker)
