"""A zip reader that accepts only archives every zip reader resolves the same way.

Two readers can disagree about a zip file: Python's ``zipfile`` keeps the *last* of two entries
of the same name and torch's (miniz) the *first*; one reader walks the central directory and
another scans local headers; names such as ``a/../b``, ``./b`` or ``a\\b`` mean one file to one
tool and another to the next; bytes hidden between entries, in a comment or behind an entry whose
central-directory record disagrees with its local header are read by one tool and not the other.
A checker that reads one copy while the loader reads another checks nothing.

``read_archive`` therefore parses the whole file itself and refuses (``ArchiveRefused``, a
``ModelLoadError``) anything but a plain, canonical layout: the entries tile the file from byte 0
to the central directory with nothing between or around them, every central record agrees with
its local header (name, method, flags, CRC, sizes, data descriptor), every name is unique (also
ignoring case) and canonical, there is no archive or entry comment, no encryption, no multi-disk
field; only stored and deflated entries, each checked against its CRC-32. What it returns, the
entry names and their bytes, is the one reading there is; callers act on those bytes and never
hand the original file to another reader.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import ModelLoadError

#: Refused beyond these (a model archive has tens of entries; the sizes bound memory for deflated entries).
MAX_ENTRIES = 100_000
MAX_TOTAL_BYTES = 1 << 36

_EOCD = struct.Struct("<4sHHHHIIH")  # sig, disk, cd disk, entries here, entries, cd size, cd offset, comment length
_LOC64 = struct.Struct("<4sIQI")  # sig, disk of zip64 EOCD, its offset, total disks
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # sig, record size, made by, needed, disk, cd disk, entries here, entries, cd size, cd offset
_CEN = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOC = struct.Struct("<4sHHHHHIIIHH")
_ALLOWED_FLAGS = 0x0002 | 0x0004 | 0x0008 | 0x0800  # deflate level hints, data descriptor, UTF-8 names
_DESCRIPTOR = 0x0008
_FULL32 = 0xFFFFFFFF


class ArchiveRefused(ModelLoadError):
    """A zip archive that two readers could resolve differently (or that is damaged): refused, never read further.

    ``why`` completes "a zip archive that ...".
    """

    def __init__(self, why: str) -> None:
        super().__init__(f"a zip archive that {why}")
        self.why = why


@dataclass(frozen=True)
class _Entry:
    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int


def _refuse(why: str) -> ArchiveRefused:
    return ArchiveRefused(why)


def _canonical(raw: bytes, flags: int) -> str:
    """The entry name if it is canonical: printable ASCII, relative, no empty, ``.`` or ``..`` segment, no backslash."""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _refuse(f"has an entry name that is not plain ASCII ({raw[:60]!r})") from None
    bad = (
        not name
        or name.startswith("/")
        or name.endswith("/")
        or "\\" in name
        or ":" in name
        or any(not (0x20 < ord(c) < 0x7F) for c in name)
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise _refuse(f"has a non-canonical entry name {name[:80]!r}")
    return name


def _zip64_extra(extra: bytes, fields: list[int]) -> list[int]:
    """Replace the 0xFFFFFFFF fields (usize, csize, offset order) from a zip64 extra block; check the extra is well formed."""
    pos, out, found = 0, list(fields), False
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise _refuse("has a truncated extra field")
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        if len(body) != size:
            raise _refuse("has a truncated extra field")
        if tag == 0x0001:
            if found:
                raise _refuse("has two zip64 extra fields in one entry")
            found = True
            wanted = [i for i, v in enumerate(fields) if v == _FULL32]
            if size < 8 * len(wanted):
                raise _refuse("has a zip64 extra field too short for its entry")
            for k, i in enumerate(wanted):
                (out[i],) = struct.unpack_from("<Q", body, 8 * k)
        pos += 4 + size
    if any(v == _FULL32 for v in out) and not found:
        raise _refuse("has an entry whose sizes need a zip64 field it lacks")
    return out


def _end_records(data: bytes) -> tuple[int, int, int]:
    """(entry count, central directory offset, where the central directory must end) from the end records."""
    end = len(data) - _EOCD.size
    if end < 0 or data[end : end + 4] != b"PK\x05\x06":
        raise _refuse("does not end with an end-of-central-directory record (damaged, or a comment follows it)")
    _, disk, cd_disk, here, total, cd_size, cd_offset, comment = _EOCD.unpack_from(data, end)
    if comment:
        raise _refuse("carries an archive comment")
    if disk or cd_disk or here != total:
        raise _refuse("spans several disks")
    cd_end = end
    loc = end - _LOC64.size
    if loc >= 0 and data[loc : loc + 4] == b"PK\x06\x07":
        _, z_disk, z_offset, disks = _LOC64.unpack_from(data, loc)
        if z_disk or disks != 1 or z_offset + _EOCD64.size != loc:
            raise _refuse("has a zip64 locator that does not point at the record before it")
        sig, size, _, _, disk64, cd_disk64, here64, total64, cd_size64, cd_offset64 = _EOCD64.unpack_from(data, z_offset)
        if sig != b"PK\x06\x06" or size != _EOCD64.size - 12 or disk64 or cd_disk64 or here64 != total64:
            raise _refuse("has a malformed zip64 end record")
        for small, big, full in ((total, total64, 0xFFFF), (cd_size, cd_size64, _FULL32), (cd_offset, cd_offset64, _FULL32)):
            if small not in (big, full):
                raise _refuse("has end records that disagree with each other")
        total, cd_size, cd_offset, cd_end = total64, cd_size64, cd_offset64, z_offset
    elif _FULL32 in (cd_size, cd_offset) or total == 0xFFFF:
        raise _refuse("needs zip64 end records it lacks")
    if cd_offset + cd_size != cd_end:
        raise _refuse("has bytes between its central directory and its end record")
    if total > MAX_ENTRIES:
        raise _refuse(f"has more than {MAX_ENTRIES} entries")
    return total, cd_offset, cd_end


def _central(data: bytes) -> tuple[list[_Entry], int]:
    """The central directory's entries (checked one by one) and where it starts."""
    total, pos, cd_end = _end_records(data)
    cd_start, entries, seen = pos, [], set()
    for _ in range(total):
        if pos + _CEN.size > cd_end or data[pos : pos + 4] != b"PK\x01\x02":
            raise _refuse("has a central directory shorter than its entry count")
        f = _CEN.unpack_from(data, pos)
        flags, method, crc, csize, usize, nlen, xlen, clen, disk, offset = f[3], f[4], f[7], f[8], f[9], f[10], f[11], f[12], f[13], f[16]
        raw = data[pos + _CEN.size : pos + _CEN.size + nlen]
        extra = data[pos + _CEN.size + nlen : pos + _CEN.size + nlen + xlen]
        pos += _CEN.size + nlen + xlen + clen
        if pos > cd_end:
            raise _refuse("has a central directory entry running past the directory")
        if clen or disk:
            raise _refuse("carries an entry comment or a multi-disk entry")
        if flags & ~_ALLOWED_FLAGS or method not in (0, 8):
            raise _refuse(f"has an encrypted entry or one compressed with method {method}")
        name = _canonical(raw, flags)
        if name.casefold() in seen:
            raise _refuse(f"holds two entries named {name!r}")
        seen.add(name.casefold())
        usize, csize, offset = _zip64_extra(extra, [usize, csize, offset])
        if method == 0 and csize != usize:
            raise _refuse(f"stores {name!r} with two different sizes")
        entries.append(_Entry(name, raw, flags, method, crc, csize, usize, offset))
    if pos != cd_end:
        raise _refuse("has bytes after its last central directory entry")
    return entries, cd_start


def _descriptor_end(data: bytes, e: _Entry, start: int, limit: int) -> int:
    """Where entry ``e``'s data descriptor ends: the one form that agrees with the central record and reaches ``limit``."""
    for sig in (True, False):
        for wide in (False, True):
            size = (4 if sig else 0) + 4 + (16 if wide else 8)
            if start + size != limit:
                continue
            body = data[start : start + size]
            if sig and body[:4] != b"PK\x07\x08":
                continue
            crc, csize, usize = struct.unpack_from("<IQQ" if wide else "<III", body, 4 if sig else 0)
            if (crc, csize, usize) == (e.crc, e.csize, e.usize):
                return limit
    raise _refuse(f"has a data descriptor for {e.name!r} that disagrees with the central directory, or bytes after it")


def _local(data: bytes, e: _Entry, limit: int) -> bytes:
    """The bytes of entry ``e``, whose local header is at ``e.offset`` and whose record must end exactly at ``limit``."""
    if e.offset + _LOC.size > limit or data[e.offset : e.offset + 4] != b"PK\x03\x04":
        raise _refuse(f"has no local header where the central directory puts {e.name!r}")
    _, _, flags, method, _, _, crc, csize, usize, nlen, xlen = _LOC.unpack_from(data, e.offset)
    raw = data[e.offset + _LOC.size : e.offset + _LOC.size + nlen]
    extra = data[e.offset + _LOC.size + nlen : e.offset + _LOC.size + nlen + xlen]
    if raw != e.raw_name or flags != e.flags or method != e.method:
        raise _refuse(f"has a local header for {e.name!r} that disagrees with the central directory")
    sizes = _zip64_extra(extra, [usize, csize]) if _FULL32 in (usize, csize) else [usize, csize]
    if not (flags & _DESCRIPTOR and (crc, *sizes) == (0, 0, 0)) and (crc, *sizes) != (e.crc, e.usize, e.csize):
        raise _refuse(f"has a local header for {e.name!r} whose CRC or sizes disagree with the central directory")
    start = e.offset + _LOC.size + nlen + xlen
    stop = start + e.csize
    if stop > limit:
        raise _refuse(f"has entries that overlap ({e.name!r})")
    if flags & _DESCRIPTOR:
        _descriptor_end(data, e, stop, limit)
    elif stop != limit:
        raise _refuse(f"has bytes between {e.name!r} and the next record")
    body = data[start:stop]
    if e.method == 8:
        inflate = zlib.decompressobj(-15)
        try:
            body = inflate.decompress(body, e.usize + 1)
        except zlib.error:
            raise _refuse(f"has a damaged compressed entry {e.name!r}") from None
        if not inflate.eof or inflate.unconsumed_tail or inflate.unused_data:
            raise _refuse(f"has a compressed entry {e.name!r} whose stream does not end where the entry does")
    if len(body) != e.usize or zlib.crc32(body) != e.crc:
        raise _refuse(f"has an entry {e.name!r} that fails its CRC or size check (damaged or altered)")
    return body


def read_archive(data: bytes) -> dict[str, bytes]:
    """Every entry of a zip archive held in ``data``, by name, in file order; ``ArchiveRefused`` unless the layout is plain.

    The local records must tile ``data`` from byte 0 to the central directory (no prefix, gap or
    overlap), so no byte of the file is left that some other reader could take for an entry.
    """
    entries, cd_start = _central(data)
    if sum(e.usize for e in entries) > MAX_TOTAL_BYTES:
        raise _refuse(f"unpacks to more than {MAX_TOTAL_BYTES} bytes")
    ordered = sorted(entries, key=lambda e: e.offset)
    if (ordered[0].offset if ordered else cd_start) != 0:
        raise _refuse("does not start with its first entry (bytes before it)")
    out: dict[str, bytes] = {}
    for k, e in enumerate(ordered):
        limit = ordered[k + 1].offset if k + 1 < len(ordered) else cd_start
        if limit <= e.offset:
            raise _refuse(f"has two entries at one offset ({e.name!r})")
        out[e.name] = _local(data, e, limit)
    return out
