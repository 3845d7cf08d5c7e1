"""Type stub of the C extension built from ``pipeline/_csvscan.c`` (see :mod:`pipeline.csvcheck`)."""

class Scanner:
    """The CSV record/field-count state machine for one file, fed chunk by chunk."""

    def __init__(self, delimiter: int) -> None: ...
    @property
    def rows(self) -> int:
        """Non-blank rows completed, header included."""
    @property
    def columns(self) -> int:
        """The header's field count (0 until the header is complete)."""
    def feed(self, data: bytes | bytearray | memoryview, max_bad: int, /) -> tuple[list[tuple[int, int]], int]:
        """Scan the next chunk; returns up to ``max_bad`` (row, fields) rows whose field count differs from the
        header's, and how many more there were."""
    def finish(self) -> tuple[bool, tuple[int, int] | None]:
        """End of input: (ended inside a quoted field, the last row if its field count is wrong)."""
