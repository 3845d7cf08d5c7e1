"""CsvVerifier: hand-written edge cases, and property tests against Python's csv module with the input
split at arbitrary chunk boundaries. Every test runs on both engines (the C extension and the pure-Python walk),
and the two are also compared with each other on arbitrary bytes."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pipeline.csvcheck
from pipeline.csvcheck import CsvReport, CsvVerifier
from pipeline.errors import IntegrityError


@pytest.fixture(autouse=True, params=["c", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with this engine as every verifier's default."""
    monkeypatch.setattr(pipeline.csvcheck, "DEFAULT_ENGINE", request.param)
    return str(request.param)


def verify(data: bytes, *, cuts: list[int] | None = None, **kw: object) -> CsvReport:
    v = CsvVerifier(**kw)  # type: ignore[arg-type]
    points = sorted({c for c in (cuts or []) if 0 < c < len(data)})
    prev = 0
    for c in [*points, len(data)]:
        v.feed(data[prev:c])
        prev = c
    return v.finish()


def every_split(data: bytes, **kw: object) -> CsvReport:
    """Check every single split point gives the same report as the whole, and return it."""
    whole = verify(data, **kw)
    for i in range(1, len(data)):
        assert verify(data, cuts=[i], **kw) == whole, f"split at {i}"
    assert verify(data, cuts=list(range(len(data))), **kw) == whole  # one byte at a time
    return whole


def reference(data: bytes, delimiter: str = ",") -> tuple[int, int, list[int]]:
    """(records, columns, field count of each non-blank row) as Python's csv module reads it."""
    rows = [r for r in csv.reader(io.StringIO(data.decode(), newline=""), delimiter=delimiter) if r]
    if not rows:
        return 0, 0, []
    return len(rows) - 1, len(rows[0]), [len(r) for r in rows]


def test_simple_lf_and_crlf() -> None:
    for nl in (b"\n", b"\r\n"):
        data = b"a,b,c" + nl + b"1,2,3" + nl + b"4,5,6" + nl
        r = every_split(data)
        assert (r.records, r.columns, r.errors) == (2, 3, ())
        assert r.bytes == len(data)


def test_no_trailing_newline_counts_last_row() -> None:
    assert every_split(b"a,b\n1,2\n3,4").records == 2
    assert every_split(b"a,b").records == 0
    assert every_split(b"").records == 0


def test_quoted_fields_with_delimiters_quotes_and_newlines() -> None:
    data = b'id,note\r\n1,"a, b"\r\n2,"say ""hi"""\r\n3,"line1\r\nline2\nline3"\r\n4,""\r\n'
    r = every_split(data)
    assert (r.records, r.columns, r.ok) == (4, 2, True)
    assert reference(data)[:2] == (4, 2)


def test_quote_inside_unquoted_field_is_data() -> None:
    data = b'a,b\n1,x"y\n2,"z"w\n'
    r = every_split(data)
    assert (r.records, r.ok) == (2, True)


def test_blank_lines_are_not_records() -> None:
    data = b"a,b\n\n1,2\r\n\r\n3,4\n\n"
    r = every_split(data)
    assert (r.records, r.ok) == (2, True)
    one_col = b"a\n\nx\r\n\r\ny\n"
    assert every_split(one_col).records == 2
    assert every_split(b'a\n""\n').records == 1  # a quoted empty field is a record


def test_non_rectangular_rows_are_reported_with_row_numbers() -> None:
    data = b"a,b,c\n1,2,3\n1,2\n1,2,3,4\n"
    r = every_split(data)
    assert r.errors == ("row 3 has 2 fields, header has 3", "row 4 has 4 fields, header has 3")
    with pytest.raises(IntegrityError, match="row 3 has 2 fields"):
        r.raise_for_errors()


def test_compensating_errors_are_still_caught() -> None:
    # Same total number of delimiters as a rectangular file: a count-only shortcut would miss it.
    r = every_split(b"a,b\n1,2,3\n4\n")
    assert r.errors == ("row 2 has 3 fields, header has 2", "row 3 has 1 fields, header has 2")


def test_nul_byte_offset() -> None:
    data = b"a,b\n1,\x002\n"
    r = every_split(data)
    assert r.errors == ("NUL byte at offset 6",)


def test_ends_inside_quoted_field() -> None:
    r = every_split(b'a,b\n1,"unterminated\n')
    assert "file ends inside a quoted field" in r.errors
    # a closing quote as the very last byte is fine
    assert every_split(b'a,b\n1,"done"').ok


def test_record_count_mismatch() -> None:
    r = verify(b"a\n1\n2\n", expected_records=3)
    assert r.errors == ("record count 2 != expected 3",)
    assert verify(b"a\n1\n2\n", expected_records=2).ok


def test_shape_checks_can_be_disabled() -> None:
    r = verify(b"a,b\n1\n\x00,2\n", check_shape=False)
    assert (r.records, r.ok) == (2, True)


def test_tsv() -> None:
    data = b'a\tb\n1\t"x\ty"\n2\t3\n'
    r = every_split(data, delimiter=b"\t")
    assert (r.records, r.columns, r.ok) == (2, 2, True)
    assert not verify(b"a\tb\n1,2\n", delimiter=b"\t").ok


def test_header_with_quotes_and_chunked_header() -> None:
    r = every_split(b'"Account.Id","Account: Name, Legal"\n1,2\n')
    assert (r.records, r.columns, r.ok) == (1, 2, True)


def test_error_cap_and_feed_after_finish() -> None:
    v = CsvVerifier(max_errors=2)
    v.feed(b"a,b\n" + b"1\n" * 10)
    assert len(v.errors) == 2
    v.finish()
    with pytest.raises(RuntimeError):
        v.feed(b"x")


def test_bad_delimiter() -> None:
    with pytest.raises(ValueError):
        CsvVerifier(delimiter=b";")


# -- property tests --------------------------------------------------------------------------------------

field_text = st.text(alphabet=st.sampled_from(["a", "b", ",", '"', "\n", "\r", "\t", " ", "é"]), max_size=8)


@st.composite
def csv_documents(draw: st.DrawFn) -> tuple[bytes, str, int]:
    delimiter = draw(st.sampled_from([",", "\t"]))
    columns = draw(st.integers(min_value=1, max_value=5))
    rows = draw(st.lists(st.lists(field_text, min_size=columns, max_size=columns), min_size=1, max_size=12))
    out = io.StringIO(newline="")
    writer = csv.writer(
        out,
        delimiter=delimiter,
        lineterminator=draw(st.sampled_from(["\n", "\r\n"])),
        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
    )
    writer.writerows(rows)
    text = out.getvalue()
    if draw(st.booleans()):
        text = text.rstrip("\r\n") if not text.endswith('"\r\n') else text  # sometimes no final newline
    return text.encode(), delimiter, columns


def assert_matches_csv_module(data: bytes, delimiter: str, cuts: list[int]) -> None:
    whole = verify(data, delimiter=delimiter.encode())
    assert verify(data, cuts=cuts, delimiter=delimiter.encode()) == whole
    if any("quoted" in e for e in whole.errors):
        return  # csv reads an unterminated quoted field differently (it may raise); we report it
    try:
        records, columns, counts = reference(data, delimiter)
    except csv.Error:
        assume(False)
        return
    assert (whole.records, whole.columns) == (records, columns)
    bad = [f"row {i + 1} has {n} fields, header has {columns}" for i, n in enumerate(counts) if n != columns]
    assert list(whole.errors) == bad[:20]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(doc=csv_documents(), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_generated_csv_matches_csv_module_at_any_split(doc: tuple[bytes, str, int], cuts: list[int]) -> None:
    data, delimiter, _ = doc
    assert_matches_csv_module(data, delimiter, cuts)


@settings(max_examples=400, deadline=None)
@given(
    data=st.text(alphabet=st.sampled_from(["a", ",", '"', "\n", "\r"]), max_size=60).map(str.encode),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
)
def test_arbitrary_bytes_match_csv_module(data: bytes, cuts: list[int]) -> None:
    """Any mix of the special bytes: same records and per-row field checks as csv, at any split."""
    assert_matches_csv_module(data, ",", cuts)


def test_generated_csv_written_with_lf_terminators_reads_back_rectangular() -> None:
    rows = [["id", "text"], *[[str(i), f'v{i}, "q"\nnext'] for i in range(200)]]
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows(rows)
    r = verify(out.getvalue().encode(), cuts=[7, 100, 1001])
    assert (r.records, r.columns, r.ok) == (200, 2, True)


# -- big files: the C engine's 16-byte blocks and GIL-free chunks, and long quoted stretches ----------------


def _big(rows: int, line: bytes = b'1,"x, ""y""\nz",3\n') -> bytes:
    return b"a,b,c\n" + line * rows


@pytest.mark.parametrize(
    ("odd", "records", "errors"),
    [
        (b'2,x"y,3\n', 2001, ()),  # a quote inside an unquoted field: the exact walk, then fast again
        (b"2,3,4\r5,6,7\n", 2002, ()),  # a bare \r ends a record
        (b"2,3\n", 2001, ("row 1002 has 2 fields, header has 3",)),
    ],
)
def test_unusual_line_in_a_big_file(odd: bytes, records: int, errors: tuple[str, ...]) -> None:
    data = _big(1000) + odd + _big(1000)[6:]
    whole = verify(data)
    assert (whole.records, whole.columns, whole.errors) == (records, 3, errors)
    for step in (1000, 4093, 65536):
        assert verify(data, cuts=list(range(step, len(data), step))) == whole


def test_quote_never_closed_in_a_big_file() -> None:
    data = _big(1000) + b'2,"open\n' + b"1,2,3\n" * 1000  # all that follows the quote is one field
    whole = verify(data)
    assert whole.records == 1001
    assert whole.errors == ("file ends inside a quoted field", "row 1002 has 2 fields, header has 3")
    assert verify(data, cuts=list(range(4093, len(data), 4093))) == whole


def test_long_quoted_field_across_chunks() -> None:
    data = b"a,b\n" + b'1,"' + b"long, quoted\n" * 50_000 + b'"\n' + b"2,3\n" * 50
    whole = verify(data)
    assert (whole.records, whole.columns, whole.ok) == (51, 2, True)
    assert verify(data, cuts=list(range(10, len(data), 65_537))) == whole


def test_line_with_more_than_65535_fields() -> None:
    header = b",".join([b"c"] * 70_000) + b"\n"
    data = header + header + b",".join([b"1"] * 69_999) + b"\n" + b"x\n" * 3
    r = verify(data, cuts=[len(data) // 2])
    assert r.records == 5
    assert r.errors[:2] == ("row 3 has 69999 fields, header has 70000", "row 4 has 1 fields, header has 70000")


def test_crlf_and_blank_lines_in_a_big_file() -> None:
    data = b"a,b\r\n" + b'1,"x\r\ny"\r\n\r\n\n' * 500 + b"2,3"
    r = verify(data, cuts=list(range(100, len(data), 777)))
    assert (r.records, r.columns, r.ok) == (501, 2, True)
    assert reference(data)[:2] == (501, 2)


# -- the two engines ---------------------------------------------------------------------------------------


def test_c_engine_is_built() -> None:
    """The package's install builds the extension; without it every transfer would verify in pure Python."""
    assert pipeline.csvcheck._csvscan is not None, "pipeline._csvscan is not built: reinstall with a C compiler"
    assert CsvVerifier(engine="c").engine == "c"


def test_c_engine_refuses_what_it_cannot_scan() -> None:
    scanner = pipeline.csvcheck._csvscan.Scanner
    for bad in (0, ord('"'), ord("\n"), ord("\r"), 256):
        with pytest.raises(ValueError):
            scanner(bad)
    with pytest.raises(TypeError):
        scanner(44).feed("text is not bytes", 1)
    s = scanner(44)
    s.feed(memoryview(b"a,b\n1,2\n"), 0)  # any bytes-like object
    assert (s.rows, s.columns) == (2, 2)


special_soup = st.binary(min_size=0, max_size=300).map(
    lambda b: bytes(b'ab,"\n\r\t\0x'[c % 9] for c in b)  # dense in the bytes that matter, NUL included
)


@settings(max_examples=400, deadline=None)
@given(data=special_soup, cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_engines_agree_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    """Same report, errors and their order included, at any split: also where csv itself gives up."""
    for delimiter in (b",", b"\t"):
        for check_shape in (True, False):
            kw = {"delimiter": delimiter, "check_shape": check_shape, "max_errors": 3, "expected_records": 2}
            assert verify(data, cuts=cuts, engine="c", **kw) == verify(data, cuts=cuts, engine="python", **kw)


@pytest.mark.parametrize("step", [1, 15, 16, 17, 4093, 70_000])
def test_engines_agree_on_a_big_file_at_any_chunking(step: int) -> None:
    """Quotes, record ends and bad rows at every offset within the C engine's 16-byte blocks."""
    lines = [b'1,"x,""y""\r\nz",3\n', b"22,333,4444\n", b"\r\n", b'5,"",6\r', b"7,8\n", b'9,x"y,\t\n', b"\n"]
    data = b"a,b,c\n" + b"".join(lines[(i * 7 + i // 5) % len(lines)] for i in range(3000))
    cuts = list(range(step, len(data), step)) if step > 1 else list(range(0, len(data), 97))
    c = verify(data, cuts=cuts, engine="c", max_errors=1000)
    assert c == verify(data, cuts=cuts, engine="python", max_errors=1000)
    assert c.records > 2000 and len(c.errors) > 100  # the "7,8" rows are short
