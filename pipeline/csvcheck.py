"""A streaming CSV/TSV verifier: counts data records and checks the file's shape, chunk by chunk.

It understands exactly what matters for counting: the delimiter, record ends (``\\n``, ``\\r\\n`` or a bare
``\\r``, as Python's :mod:`csv` module reads them), and ``"``-quoted fields, in which delimiters, quotes
(``""``) and newlines are data. A quote is special only at the start of a field, as in the csv module.
Blank lines are not records (``csv.DictReader`` skips them too). Rows are numbered from 1 with the
header as row 1. Quote-free stretches are handled with ``bytes.split``/``bytes.count`` (C speed, no
per-byte Python); only quoted fields are walked, with ``bytes.find`` from quote to quote.

Two interchangeable engines run that state machine. The default is the C extension ``pipeline._csvscan`` (built
with the package: one pass, 16 bytes at a time between quotes and record ends, ``memchr`` inside quoted fields,
the GIL released for big chunks). The pure-Python walk below is the fallback when the extension is not built (a
source tree used without installing it, or ``AQUA_PIPELINE_NO_EXTENSIONS=1``), and the reference the tests hold
the C engine to; both give the same reports, errors included.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from itertools import repeat
from typing import Literal

from pipeline.errors import IntegrityError
from pipeline.settings import NO_EXTENSIONS_VARIABLE

logger = logging.getLogger(__name__)

try:
    from pipeline import _csvscan
except ImportError:  # the extension is not built (a source tree used without installing it)
    _csvscan = None  # type: ignore[assignment]

Engine = Literal["c", "python"]
#: The engine a verifier uses unless told otherwise.
DEFAULT_ENGINE: Engine = "c" if _csvscan is not None and not os.environ.get(NO_EXTENSIONS_VARIABLE) else "python"

_QUOTE = 0x22
_NL = 0x0A
_CR = 0x0D
# Parser states between chunks.
_PLAIN = 0  # outside any quoted field
_QUOTED = 1  # inside a quoted field
_QUOTE_SEEN = 2  # inside a quoted field, the last byte was a quote: an escape ("") or the closing quote


@dataclass(frozen=True)
class CsvReport:
    """What a finished verification found. ``columns`` is the header's field count (0 for an empty file)."""

    records: int
    columns: int
    bytes: int
    errors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when no error was recorded."""
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise :class:`IntegrityError` naming the first errors, if any."""
        if self.errors:
            raise IntegrityError("; ".join(self.errors[:3]))


class CsvVerifier:
    """Incremental verifier: call :meth:`feed` with each decoded chunk, then :meth:`finish` once.

    ``check_shape`` enables the shape checks (field counts, NUL bytes, unterminated quote); record counting
    always runs and is compared with ``expected_records`` when that is given. Errors are recorded, not
    raised, in ``errors`` (at most ``max_errors``); callers that want to fail fast check it after each feed.
    ``engine`` picks the C state machine or the pure-Python one (default :data:`DEFAULT_ENGINE`).
    """

    def __init__(
        self,
        *,
        delimiter: bytes = b",",
        expected_records: int | None = None,
        check_shape: bool = True,
        max_errors: int = 20,
        engine: Engine | None = None,
    ) -> None:
        if delimiter not in (b",", b"\t"):
            raise ValueError("delimiter must be ',' or '\\t'")
        self.engine: Engine = engine or DEFAULT_ENGINE
        if self.engine == "c" and _csvscan is None:
            raise ValueError("the C engine is not built (pipeline._csvscan is missing)")
        self._scanner = _csvscan.Scanner(delimiter[0]) if self.engine == "c" and _csvscan is not None else None
        self._delim = delimiter
        self._delim_byte = delimiter[0]
        # A quoted field at a field start, closed by a quote that is neither escaped nor the chunk's last byte.
        d = re.escape(delimiter)
        # (The quote comes first, with the field-start test as a nested lookbehind: 3x faster than the reverse.)
        self._field_ends = (delimiter, b"\n", b"\r")
        self._closed_field = re.compile(rb'"(?<=(?<![^' + d + rb'\r\n])")[^"]*(?:""[^"]*)*"(?!"|\Z)')
        self._expected = expected_records
        self._check_shape = check_shape
        self._max_errors = max_errors
        self.errors: list[str] = []
        self._offset = 0  # bytes fed so far
        # The pure-Python engine's state (the C engine keeps its own).
        self._state = _PLAIN
        self._at_field_start = True  # the next byte begins a field (a quote there opens a quoted field)
        self._row_delims = 0  # delimiters seen in the current row
        self._row_bytes = 0  # bytes seen in the current row (to tell blank lines apart)
        self._rows = 0  # non-blank rows completed, header included
        self._columns = 0
        self._finished = False

    @property
    def records(self) -> int:
        """Data records completed so far (header excluded)."""
        rows = self._scanner.rows if self._scanner is not None else self._rows
        return max(rows - 1, 0)

    def feed(self, data: bytes) -> None:
        """Consume the next chunk; chunk boundaries may fall anywhere."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not data:
            return
        if self._check_shape:
            nul = data.find(b"\0")
            if nul >= 0:
                self._error(f"NUL byte at offset {self._offset + nul}")
        self._offset += len(data)
        if self._scanner is None:
            self._exact(data)
            return
        room = max(self._max_errors - len(self.errors), 0) if self._check_shape else 0
        bad, _more = self._scanner.feed(data, room)
        for row, fields in bad:
            self._field_error(row, fields)

    def finish(self) -> CsvReport:
        """End of input: close the last row, run the end-of-file checks, and return the report."""
        if not self._finished:
            self._finished = True
            if self._scanner is not None:
                open_quote, last = self._scanner.finish()
                if open_quote and self._check_shape:
                    self._error("file ends inside a quoted field")
                if last is not None and self._check_shape:
                    self._field_error(*last)
                self._columns = self._scanner.columns
            else:
                if self._state == _QUOTED and self._check_shape:
                    self._error("file ends inside a quoted field")
                if self._row_bytes:
                    self._end_row()
            if self._expected is not None and self.records != self._expected:
                self._error(f"record count {self.records} != expected {self._expected}", force=True)
        return CsvReport(records=self.records, columns=self._columns, bytes=self._offset, errors=tuple(self.errors))

    # -- internals ---------------------------------------------------------------------------------------

    def _error(self, message: str, *, force: bool = False) -> None:
        if force or len(self.errors) < self._max_errors:
            self.errors.append(message)

    def _field_error(self, row: int, fields: int) -> None:
        columns = self._scanner.columns if self._scanner is not None else self._columns
        self._error(f"row {row} has {fields} fields, header has {columns}")

    def _exact(self, data: bytes) -> None:
        """The exact state machine over ``data`` (any state, any boundary)."""
        n = len(data)
        i = 0
        while i < n and self._state != _PLAIN:  # a quoted field carried over from the previous chunk
            i = self._step(data, i, n)
        if i < n:
            if not self._at_field_start:  # quotes right after a non-delimiter are data
                while i < n and data[i] == _QUOTE:
                    i += 1
                    self._row_bytes += 1
            seg = data[i:] if i else data
            if b'"' in seg:
                seg = self._quoted_fast(seg)
            if b'"' in seg:
                # Collapse every quoted field that closes inside this chunk to one placeholder byte, in C.
                # What is left has no quote that matters, except one opening a field that runs past the chunk.
                seg = self._closed_field.sub(b"x", seg)
            j, m = 0, len(seg)
            while j < m:
                j = self._step(seg, j, m)

    def _quoted_fast(self, seg: bytes) -> bytes:
        """Handle ``seg`` (plain state, quotes in it) up to its last record end outside quotes; return the rest.

        Split on quotes, the pieces alternate outside/inside a quoted field (an escaped ``""`` leaves an empty
        outside piece, and parity still holds) as long as every quote that opens a field is at a field start.
        That is checked for all pieces at once (``bytes.endswith`` over the list), then the outside pieces are
        joined with one placeholder byte per quoted stretch and counted as a quote-free stretch. A chunk that
        breaks the rule (a quote inside an unquoted field) is returned whole, for the exact walk.
        """
        pieces = seg.split(b'"')
        last = len(pieces) - 1 if len(pieces) % 2 else len(pieces) - 2  # the last piece outside quotes
        while last >= 0 and b"\n" not in pieces[last] and b"\r" not in pieces[last]:
            last -= 2
        if last < 0:
            return seg
        tail = pieces[last]
        cut = max(tail.rfind(b"\n"), tail.rfind(b"\r")) + 1
        head = pieces[: last + 1 : 2]  # the outside pieces of the part handled here
        opening = head[:-1]  # each is followed by a quote that opens a quoted stretch
        if opening:
            ends = list(map(bytes.endswith, opening, repeat(self._field_ends)))
            # An empty piece after a closing quote is an escaped quote; the first one needs a field start.
            if ends.count(False) != opening.count(b"") or (not opening[0] and not self._at_field_start):
                return seg
        head[-1] = tail[:cut]
        plain = b"x".join(head)
        self._plain(plain, 0, len(plain))
        rest = pieces[last + 1 :]
        if not rest:
            return tail[cut:]
        return tail[cut:] + b'"' + b'"'.join(rest)

    def _step(self, data: bytes, i: int, n: int) -> int:
        """Advance the state machine from ``data[i]``; return the next index."""
        if self._state == _PLAIN:
            return self._plain_until_quote(data, i, n)
        if self._state == _QUOTED:
            return self._quoted(data, i, n)
        # _QUOTE_SEEN: a quote ended the previous chunk; a second one makes it an escaped quote.
        if data[i] == _QUOTE:
            self._state = _QUOTED
            self._row_bytes += 1
            return i + 1
        self._state = _PLAIN
        return i

    def _end_row(self) -> None:
        """Close a non-blank row with ``self._row_delims`` delimiters."""
        fields = self._row_delims + 1
        self._rows += 1
        if self._rows == 1:
            self._columns = fields
        elif fields != self._columns and self._check_shape:
            self._field_error(self._rows, fields)
        self._row_delims = 0
        self._row_bytes = 0

    def _quoted(self, data: bytes, i: int, n: int) -> int:
        """Inside a quoted field from ``i``: skip to the closing quote; return where plain parsing resumes."""
        start = i
        while True:
            q = data.find(b'"', i)
            if q < 0:
                self._row_bytes += n - start
                return n
            if q + 1 == n:  # escape or close: the next chunk decides
                self._state = _QUOTE_SEEN
                self._row_bytes += n - start
                return n
            if data[q + 1] == _QUOTE:
                i = q + 2
                continue
            self._state = _PLAIN
            self._at_field_start = False
            self._row_bytes += q + 1 - start
            return q + 1

    def _plain_until_quote(self, data: bytes, i: int, n: int) -> int:
        """Plain text from ``i``: handle up to the next quote that opens a field; return the next index."""
        while True:
            q = data.find(b'"', i)
            end = n if q < 0 else q
            if end > i:
                self._plain(data, i, end)
            if q < 0:
                return n
            # The quote opens a quoted field only at a field start; elsewhere it is data.
            if self._at_field_start:
                self._state = _QUOTED
                self._row_bytes += 1
                self._at_field_start = False
                return q + 1
            self._row_bytes += 1
            i = q + 1

    def _plain(self, data: bytes, start: int, end: int) -> None:
        """A quote-free stretch ``data[start:end]`` (non-empty)."""
        last = data[end - 1]
        self._at_field_start = last in (_NL, _CR, self._delim_byte)
        if data.find(b"\r", start, end) >= 0:
            # \r ends a record as \n does; "\r\n" first becomes "\n". A "\r" | "\n" pair split across
            # stretches yields one extra empty line, which is blank and so not a record.
            seg = data[start:end].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            data, start, end = seg, 0, len(seg)
        first_nl = data.find(b"\n", start, end)
        if first_nl < 0:
            self._extend_row(data, start, end)
            return
        self._extend_row(data, start, first_nl)
        if self._row_bytes:
            self._end_row()
        last_nl = data.rfind(b"\n", first_nl, end)
        if last_nl > first_nl:
            self._whole_lines(data[first_nl + 1 : last_nl].split(b"\n"))
        if last_nl + 1 < end:
            self._extend_row(data, last_nl + 1, end)

    def _extend_row(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._row_bytes += end - start
            self._row_delims += data.count(self._delim, start, end)

    def _whole_lines(self, lines: list[bytes]) -> None:
        """Complete, quote-free lines (no newline): count and check them without a per-line Python loop."""
        counts = list(map(bytes.count, lines, repeat(self._delim)))
        if self._rows == 0:  # header not seen yet: take the slow path for the first lines
            for line, c in zip(lines, counts, strict=True):
                if line:
                    self._row_delims = c
                    self._row_bytes = len(line)
                    self._end_row()
            return
        want = self._columns - 1
        if counts.count(want) == len(lines):
            # Blank lines have no delimiter, so they can only be among the "good" lines of a 1-column file.
            self._rows += len(lines) - (lines.count(b"") if want == 0 else 0)
            return
        # Some line differs: walk them to number the rows in error messages.
        for line, c in zip(lines, counts, strict=True):
            if not line:
                continue
            self._rows += 1
            if c != want and self._check_shape:
                self._field_error(self._rows, c + 1)
