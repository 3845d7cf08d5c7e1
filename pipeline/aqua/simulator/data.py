"""Deterministic, seeded result files generated as a stream, fast.

A file is described by a :class:`FileSpec` (object, columns, options, which rows). Its bytes depend only on
the spec and the seed, never on wall-clock time, so the same file id always yields the same bytes.

Speed comes from templates: rows are generated in blocks of :data:`BLOCK_ROWS`. Every value except the
block number is a function of ``(variant, row in block)`` with ``variant = block % VARIANTS``, so each variant
is formatted once as a byte template and a block is that template with the block number substituted for a
fixed-width placeholder (``bytes.replace``, C speed). Sizes follow from the templates without generating.
Incremental files (a few changed/deleted rows) are formatted row by row.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.aqua.simulator.catalog import OBJECTS, label
from pipeline.aqua.validation import Column

BLOCK_ROWS = 1000
VARIANTS = 4
CHUNK_BYTES = 512 * 1024
PH_HEX = "\x01" * 12
PH_DEC = "\x02" * 8
_PH_HEX_B = PH_HEX.encode()
_PH_DEC_B = PH_DEC.encode()
_M64 = (1 << 64) - 1
_EPOCH = 1577836800  # 2020-01-01T00:00:00Z
_PACIFIC = -8 * 3600
ZIP_DATE = (2020, 1, 1, 0, 0, 0)

CONTENT_TYPES = {
    "csv": "text/csv;charset=UTF-8",
    "tsv": "text/tab-separated-values;charset=UTF-8",
    "gzip": "application/x-gzip;charset=UTF-8",
    "zip": "application/zip;charset=UTF-8",
}

_COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Hooli", "Vandelay", "Soylent", "Tyrell")
_COMPANY_KIND = ("Industries", "Labs", "Systems", "Holdings", "Group", "Trading")
_COMPANY_SUFFIX = ("", ", Inc.", " GmbH", ' "The Best" Co', " & Sons", " S.A.", " (EMEA)\nBranch", ", LLC", "", "")
_FIRST = ("Ada", "Grace", "Alan", "Zoë", "Linus", "Margaret", "José", "Barbara", "Ken", "Frances", "Søren", "Mei")
_LAST = ("Lovelace", "Hopper", "Turing", "O'Brien", "Torvalds", "Hamilton", "Müller", "Liskov", "Thompson", "Allen")
_CITIES = ("Springfield", "Berlin", "Paris", "Tokyo", "São Paulo", "Toronto", "Austin", "Dublin", "Foster City")
_TEXT = (
    "Renewal pending",
    "Customer asked for a call back, then e-mail",
    'Priority "gold" account',
    "Line one\nLine two",
    "Net terms agreed; see contract",
    "Übergabe an Vertrieb",
    "Migrated from legacy system",
    "Discount 10%, valid until year end",
)
_CURRENCIES = ("USD", "USD", "USD", "EUR", "GBP", "JPY", "CAD", "AUD")


def _mix(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _salt(seed: int, *parts: str) -> int:
    return _mix((seed * 1_000_003 + zlib.crc32(":".join(parts).encode())) & _M64)


def object_tag(seed: int, obj: str) -> str:
    """The 8 hex characters that start every id of ``obj``."""
    return f"{_salt(seed, 'tag', obj) & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class Incremental:
    """The rows of an incremental load: ``changed`` rows spread over ``total_rows``, the last ones of every
    ``changed // deleted`` flagged deleted, all with ``UpdatedDate = updated_at``."""

    total_rows: int
    generation: int
    changed: int
    deleted: int
    updated_at: float

    def rows(self) -> Iterator[tuple[int, bool]]:
        """``(row index, deleted)`` in file order."""
        if self.changed <= 0 or self.total_rows <= 0:
            return
        n = min(self.changed, self.total_rows)
        step = max(1, self.total_rows // n)
        start = (self.generation * 7919) % step
        every = n // self.deleted if self.deleted else 0
        for j in range(n):
            yield start + j * step, bool(every) and j % every == every - 1


@dataclass(frozen=True)
class FileSpec:
    """Everything that determines one result file's bytes."""

    file_id: str
    obj: str
    columns: tuple[Column, ...]
    fmt: str = "csv"
    labels: bool = True
    null: str = ""
    utc: bool = True
    deleted_column: str | None = None
    deleted_format: str = "Boolean"
    start: int = 0
    end: int = 0
    incremental: Incremental | None = None
    entry_name: str = "export.csv"
    created_at: float = 0.0
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def records(self) -> int:
        """Data rows in the file (known without generating it)."""
        if self.incremental is not None:
            return min(self.incremental.changed, self.incremental.total_rows)
        return max(0, self.end - self.start)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]

    @property
    def delimiter(self) -> str:
        return "\t" if self.fmt == "tsv" else ","


def _quote(cell: str, delim: str) -> str:
    if delim in cell or '"' in cell or "\n" in cell or "\r" in cell:
        return '"' + cell.replace('"', '""') + '"'
    return cell


def _fmt_ts(ts: int | float, utc: bool) -> str:
    if utc:
        return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(ts))
    return time.strftime("%Y-%m-%dT%H:%M:%S-0800", time.gmtime(ts + _PACIFIC))


class _Rows:
    """Formats the cells of one spec's rows; the slow path shared by templates and incremental rows."""

    def __init__(self, seed: int, spec: FileSpec) -> None:
        self.seed = seed
        self.spec = spec
        self.kinds = [OBJECTS.get(c.source, {}).get(c.field, "text?") for c in spec.columns]
        self.salts = [_salt(seed, spec.obj, c.alias or "", c.field) for c in spec.columns]
        self.tag = object_tag(seed, spec.obj)

    def header(self) -> str:
        d = self.spec.delimiter
        names: list[str] = []
        if self.spec.deleted_column:
            col = self.spec.deleted_column
            names.append(f"{self.spec.obj}.{col}" if self.spec.labels else f"{label(self.spec.obj)}: {col}")
        for c in self.spec.columns:
            owner = c.alias or c.source
            names.append(f"{owner}.{c.field}" if self.spec.labels else f"{label(owner)}: {label(c.field)}")
        return d.join(_quote(n, d) for n in names) + "\n"

    def line(self, v: int, r: int, *, deleted: bool = False, updated: float | None = None) -> str:
        d = self.spec.delimiter
        cells: list[str] = []
        if self.spec.deleted_column:
            if self.spec.deleted_format == "Numeric":
                cells.append("1" if deleted else "0")
            else:
                cells.append("true" if deleted else "false")
        for c, kind, salt in zip(self.spec.columns, self.kinds, self.salts, strict=True):
            if updated is not None and c.alias is None and kind == "updated":
                cells.append(_fmt_ts(updated, self.spec.utc))
                continue
            value = self._value(kind, salt, v, r, own=c.alias is None)
            cells.append(self.spec.null if value is None else _quote(value, d))
        return d.join(cells) + "\n"

    def _value(self, kind: str, salt: int, v: int, r: int, *, own: bool) -> str | None:
        u = _mix(salt ^ (v << 24) ^ r)
        if kind.endswith("?"):
            if (u >> 56) % 8 == 0:
                return None
            kind = kind[:-1]
        head, _, arg = kind.partition(":")
        if head == "id":
            if own:
                return f"{self.tag}{PH_HEX}{r:012x}"
            head, arg = "ref", self.spec.obj
        if head == "ref":
            j = u % BLOCK_ROWS
            return f"{object_tag(self.seed, arg)}{0:012x}{j:012x}"
        if head == "code":
            return f"{arg}{PH_DEC}{r:04d}" if own else f"{arg}{u % 10**8:08d}{u % 10000:04d}"
        if head == "company":
            return (
                f"{_COMPANIES[u % 10]} {_COMPANY_KIND[(u >> 8) % 6]}{_COMPANY_SUFFIX[(u >> 16) % len(_COMPANY_SUFFIX)]}"
            )
        if head == "first":
            return _FIRST[u % len(_FIRST)]
        if head == "last":
            return _LAST[u % len(_LAST)]
        if head == "email":
            return f"user{u % 1_000_000}@example.com"
        if head == "address":
            street = f"{u % 9999 + 1} {_LAST[(u >> 8) % len(_LAST)]} Street"
            return street + ("\nSuite 5" if (u >> 20) % 5 == 0 else ", Floor 2" if (u >> 20) % 5 == 1 else "")
        if head == "city":
            return _CITIES[u % len(_CITIES)]
        if head == "text":
            return _TEXT[u % len(_TEXT)]
        if head == "money":
            cents = u % 10_000_000
            return f"{cents // 100}.{cents % 100:02d}"
        if head == "int":
            lo, hi = (int(x) for x in arg.split(":"))
            return str(lo + u % (hi - lo + 1))
        if head == "bool":
            return "true" if u & 1 else "false"
        if head == "enum":
            options = arg.split("|")
            return options[u % len(options)]
        if head == "currency":
            return _CURRENCIES[u % len(_CURRENCIES)]
        if head == "date":
            return time.strftime("%Y-%m-%d", time.gmtime(_EPOCH + (u % 2000) * 86400))
        created = _EPOCH + _mix(_salt(self.seed, self.spec.obj, "created") ^ (v << 24) ^ r) % (5 * 365 * 86400)
        if head == "created":
            return _fmt_ts(created, self.spec.utc)
        if head == "updated":
            return _fmt_ts(created + u % (365 * 86400), self.spec.utc)
        return str(u)


@dataclass(frozen=True)
class _Template:
    blobs: tuple[bytes, ...]
    offsets: tuple[tuple[int, ...], ...]
    has_dec: bool
    header: bytes

    def block(self, b: int, r0: int, r1: int) -> bytes:
        v = b % VARIANTS
        off = self.offsets[v]
        out = self.blobs[v][off[r0] : off[r1]].replace(_PH_HEX_B, b"%012x" % b)
        return out.replace(_PH_DEC_B, b"%08d" % b) if self.has_dec else out

    def size(self, start: int, end: int) -> int:
        total = 0
        pos = start
        while pos < end:
            b = pos // BLOCK_ROWS
            r0 = pos - b * BLOCK_ROWS
            r1 = min(BLOCK_ROWS, end - b * BLOCK_ROWS)
            off = self.offsets[b % VARIANTS]
            total += off[r1] - off[r0]
            pos = b * BLOCK_ROWS + r1
        return total


_TEMPLATES: OrderedDict[tuple[object, ...], _Template] = OrderedDict()
_TEMPLATE_CACHE = 32
_TEMPLATE_LOCK = threading.Lock()


def _template(seed: int, spec: FileSpec) -> _Template:
    """The (cached) templates of ``spec``; thread-safe, since sizes and digests are computed in threads."""
    with _TEMPLATE_LOCK:
        return _template_locked(seed, spec)


def _template_locked(seed: int, spec: FileSpec) -> _Template:
    key = (seed, spec.obj, spec.columns, spec.labels, spec.null, spec.utc, spec.fmt == "tsv", spec.deleted_column,
           spec.deleted_format)  # fmt: skip
    tpl = _TEMPLATES.get(key)
    if tpl is not None:
        _TEMPLATES.move_to_end(key)
        return tpl
    rows = _Rows(seed, spec)
    blobs: list[bytes] = []
    offsets: list[tuple[int, ...]] = []
    for v in range(VARIANTS):
        lines = [rows.line(v, r).encode() for r in range(BLOCK_ROWS)]
        off = [0]
        for ln in lines:
            off.append(off[-1] + len(ln))
        blobs.append(b"".join(lines))
        offsets.append(tuple(off))
    tpl = _Template(tuple(blobs), tuple(offsets), any(_PH_DEC_B in b for b in blobs), rows.header().encode())
    _TEMPLATES[key] = tpl
    if len(_TEMPLATES) > _TEMPLATE_CACHE:
        _TEMPLATES.popitem(last=False)
    return tpl


def _incremental_lines(seed: int, spec: FileSpec) -> Iterator[bytes]:
    assert spec.incremental is not None
    rows = _Rows(seed, spec)
    inc = spec.incremental
    buf: list[bytes] = []
    size = 0
    for i, deleted in inc.rows():
        b, r = divmod(i, BLOCK_ROWS)
        line = rows.line(b % VARIANTS, r, deleted=deleted, updated=inc.updated_at)
        data = line.replace(PH_HEX, f"{b:012x}").replace(PH_DEC, f"{b:08d}").encode()
        buf.append(data)
        size += len(data)
        if size >= CHUNK_BYTES:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


def iter_text(seed: int, spec: FileSpec) -> Iterator[bytes]:
    """The uncompressed CSV/TSV bytes of ``spec``: header row, then the data rows, in chunks."""
    tpl = _template(seed, spec)
    yield tpl.header
    if spec.incremental is not None:
        yield from _incremental_lines(seed, spec)
        return
    pieces: list[bytes] = []
    size = 0
    pos = spec.start
    while pos < spec.end:
        b = pos // BLOCK_ROWS
        r0 = pos - b * BLOCK_ROWS
        r1 = min(BLOCK_ROWS, spec.end - b * BLOCK_ROWS)
        piece = tpl.block(b, r0, r1)
        pieces.append(piece)
        size += len(piece)
        pos = b * BLOCK_ROWS + r1
        if size >= CHUNK_BYTES:
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces, size = [], 0
    if pieces:
        yield b"".join(pieces)


def text_size(seed: int, spec: FileSpec) -> int:
    """Size of the uncompressed text without generating it (incremental files are generated: they are small)."""
    tpl = _template(seed, spec)
    if spec.incremental is not None:
        return len(tpl.header) + sum(len(c) for c in _incremental_lines(seed, spec))
    return len(tpl.header) + tpl.size(spec.start, spec.end)


def gzip_stream(chunks: Iterator[bytes], level: int) -> Iterator[bytes]:
    """Gzip-compress a chunk stream (deterministic: no mtime, no file name)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    yield comp.flush()


class _Sink(io.RawIOBase):
    """A write-only, non-seekable buffer: makes :mod:`zipfile` stream with data descriptors."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.parts.append(bytes(b))
        return len(b)

    def drain(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def zip_stream(chunks: Iterator[bytes], entry_name: str, level: int) -> Iterator[bytes]:
    """A zip archive with one entry, written as a stream (zip64, data descriptor, fixed timestamp)."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        info = zipfile.ZipInfo(entry_name, date_time=ZIP_DATE)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        for attr in ("compress_level", "_compresslevel"):  # 3.13+ / 3.11-3.12 (ZipInfo has __slots__)
            if hasattr(info, attr):
                setattr(info, attr, level)
                break
        with zf.open(info, "w", force_zip64=True) as entry:
            for chunk in chunks:
                entry.write(chunk)
                out = sink.drain()
                if out:
                    yield out
    yield sink.drain()


def iter_file(seed: int, spec: FileSpec, level: int = 1) -> Iterator[bytes]:
    """The file's bytes as stored (CSV/TSV, or the .gz / .zip for those formats), in chunks."""
    text = iter_text(seed, spec)
    if spec.fmt == "gzip":
        return gzip_stream(text, level)
    if spec.fmt == "zip":
        return zip_stream(text, spec.entry_name, level)
    return text


def digest_sync(seed: int, spec: FileSpec, level: int = 1) -> tuple[int, str, int]:
    """``(size, sha256 hex, records)`` of the stored file, by streaming it."""
    h = hashlib.sha256()
    size = 0
    for chunk in iter_file(seed, spec, level):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest(), spec.records
