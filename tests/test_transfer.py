"""S3Transfer against the real moto server process: single PutObject, multipart, bounded memory, integrity
failures (nothing left under the key, no dangling multipart upload), gzip handling, checksums, errors."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import logging
import random
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline import multipart
from pipeline.aws import AwsClients
from pipeline.errors import AquaUnavailable, IntegrityError, StorageError
from pipeline.models import FileSource
from pipeline.settings import MIB, S3Settings
from pipeline.transfer import S3Transfer, StoredObject, TransferSpec, TransferStats

CHUNK = 256 * 1024


def csv_data(rows: int, *, header: bytes = b"Account.Id,Account.Name,Account.Balance\n") -> bytes:
    """A CSV whose rows all differ (so a reordered or repeated part changes the bytes)."""
    return header + b"".join(b'%08d,"Name, %d",%d.%02d\n' % (i, i * 7, i, i % 100) for i in range(rows))


def rows_for(size: int) -> int:
    return size // len(b'00000000,"Name, 0000000",000000.00\n') + 1


async def chunks(
    data: bytes, *, size: int = CHUNK, fail_at: int | None = None, exc: BaseException | None = None
) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        if fail_at is not None and i >= fail_at:
            assert exc is not None
            raise exc
        yield data[i : i + size]


def source(
    data: bytes,
    *,
    declared: int | str | None = "exact",
    encoding: str | None = None,
    content_type: str = "text/csv;charset=UTF-8",
    it: AsyncIterator[bytes] | None = None,
) -> FileSource:
    return FileSource(
        file_id="f1",
        chunks=it if it is not None else chunks(data),
        content_length=len(data) if declared == "exact" else declared,  # type: ignore[arg-type]
        content_type=content_type,
        content_encoding=encoding,
    )


def s3_settings(**kw: Any) -> S3Settings:
    return S3Settings(**{"part_size": 5 * MIB, "parts_in_flight": 2, **kw})


def spec(bucket: str, key: str = "out/file.csv", **kw: Any) -> TransferSpec:
    base: dict[str, Any] = {"kind": "csv", "expected_records": None, "metadata": {"job-id": "j1", "batch-id": "b1"}}
    return TransferSpec(bucket=bucket, key=key, **{**base, **kw})


_NOT_VALUES = {"x-amz-checksum-algorithm", "x-amz-checksum-type", "x-amz-checksum-mode"}


class S3Calls:
    """Counts S3 operations (and the most that ran at once) through botocore's event hooks."""

    def __init__(self, s3: Any) -> None:
        self.ops: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight: Counter[str] = Counter()
        self.checksum_headers: Counter[str] = Counter()
        s3.meta.events.register("before-call.s3", self._before)
        s3.meta.events.register("after-call.s3", self._after)
        s3.meta.events.register("after-call-error.s3", self._after)
        s3.meta.events.register("before-send.s3", self._send)

    def _before(self, model: Any, **_: Any) -> None:
        self.ops[model.name] += 1
        if model.name == "UploadPart":
            self.in_flight += 1
            self.max_in_flight["UploadPart"] = max(self.max_in_flight["UploadPart"], self.in_flight)

    def _after(self, model: Any, **_: Any) -> None:
        if model.name == "UploadPart":
            self.in_flight -= 1

    def _send(self, request: Any, **_: Any) -> None:
        for name in request.headers:
            if name.lower().startswith("x-amz-checksum-") and name.lower() not in _NOT_VALUES:
                self.checksum_headers[name.lower()] += 1


async def assert_nothing_left(aws: AwsClients, bucket: str, key: str) -> None:
    listed = await aws.s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed.get("Contents", [])] == []
    uploads = await aws.s3.list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []


async def read(aws: AwsClients, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
    resp = await aws.s3.get_object(Bucket=bucket, Key=key)
    async with resp["Body"] as body:
        data = await body.read()
    return data, resp


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


# -- part planning ---------------------------------------------------------------------------------------


def test_plan_part_size() -> None:
    plan = S3Transfer.plan_part_size
    assert plan(8 * MIB, None) == 8 * MIB
    assert plan(1 * MIB, None) == 5 * MIB  # S3 minimum
    assert plan(8 * MIB, 2047 * 10**6) == 8 * MIB
    assert plan(8 * MIB, 100 * 1024 * MIB) == 11 * MIB  # 100 GiB / 10,000 = 10.24 MiB, rounded up to whole MiB
    assert plan(8 * MIB, 60 * 1024 * 1024 * MIB) == 5 * 1024 * MIB  # capped at 5 GiB
    for size in (80 * 1024 * MIB, 80 * 1024 * MIB + 1, 10**12, 3 * 10**13):
        part = plan(8 * MIB, size)
        assert part % MIB == 0 and -(-size // part) <= 10_000


# -- happy paths -----------------------------------------------------------------------------------------


async def test_small_file_is_one_put_object_with_checksum_metadata_and_content_type(
    aws: AwsClients, bucket: str
) -> None:
    data = csv_data(1000)
    calls = S3Calls(aws.s3)
    progress: list[int] = []
    transfer = S3Transfer(aws.s3, s3_settings(), on_progress=progress.append)
    stored = await transfer.store(source(data), spec(bucket, expected_records=1000))

    assert calls.ops["PutObject"] == 1 and calls.ops["CreateMultipartUpload"] == 0
    assert calls.checksum_headers == {"x-amz-checksum-crc32": 1}
    body, resp = await read(aws, bucket, "out/file.csv")
    assert body == data
    assert resp["ContentType"] == "text/csv; charset=utf-8"
    assert resp["Metadata"] == {"job-id": "j1", "batch-id": "b1"}
    assert stored == StoredObject(
        bucket=bucket,
        key="out/file.csv",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        record_count=1000,
        content_type="text/csv; charset=utf-8",
        content_encoding=None,
        etag=hashlib.md5(data).hexdigest(),
        parts=1,
    )
    attrs = await aws.s3.get_object_attributes(Bucket=bucket, Key="out/file.csv", ObjectAttributes=["Checksum"])
    assert attrs["Checksum"]["ChecksumCRC32"] == b64(crc32(data))
    assert progress[-1] == len(data) and progress == sorted(progress)


@pytest.mark.parametrize("algorithm", ["CRC32", "SHA256"])
async def test_multipart_file_lands_byte_identical_with_part_checksums(
    aws: AwsClients, bucket: str, algorithm: str
) -> None:
    data = csv_data(rows_for(12 * MIB))
    n = data.count(b"\n") - 1
    calls = S3Calls(aws.s3)
    stats = TransferStats()
    transfer = S3Transfer(aws.s3, s3_settings(checksum_algorithm=algorithm))
    stored = await transfer.store(source(data), spec(bucket, expected_records=n), stats=stats)

    assert stored.parts == 3 and stats.parts == 3
    assert calls.ops["UploadPart"] == 3 and calls.ops["PutObject"] == 0
    assert calls.ops["CompleteMultipartUpload"] == 1
    assert calls.checksum_headers == {f"x-amz-checksum-{algorithm.lower()}": 3}
    body, resp = await read(aws, bucket, "out/file.csv")
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest() == stored.sha256
    assert stored.size == len(data) == stats.bytes_out == stats.bytes_in
    assert stored.record_count == n
    assert stored.etag.endswith("-3")
    assert resp["ContentType"] == "text/csv; charset=utf-8" and resp["Metadata"]["batch-id"] == "b1"
    # S3 (and moto) derive the object's composite checksum from the part checksums we sent.
    parts = [data[i : i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
    digest = crc32 if algorithm == "CRC32" else (lambda b: hashlib.sha256(b).digest())
    composite = b"".join(digest(p) for p in parts)
    attrs = await aws.s3.get_object_attributes(Bucket=bucket, Key="out/file.csv", ObjectAttributes=["Checksum"])
    assert attrs["Checksum"][f"Checksum{algorithm}"].split("-")[0] == b64(digest(composite))
    assert stats.buffered_bytes == 0


async def test_exactly_one_part_is_still_a_single_put(aws: AwsClients, bucket: str) -> None:
    data = random.Random(1).randbytes(5 * MIB)
    calls = S3Calls(aws.s3)
    stored = await S3Transfer(aws.s3, s3_settings()).store(source(data), spec(bucket, "z.zip", kind="zip"))
    assert calls.ops["PutObject"] == 1 and stored.parts == 1


async def test_memory_stays_bounded_and_parts_in_flight_are_capped(aws: AwsClients, bucket: str) -> None:
    data = random.Random(2).randbytes(40 * MIB)
    calls = S3Calls(aws.s3)
    stats = TransferStats()
    settings = s3_settings(parts_in_flight=2)
    stored = await S3Transfer(aws.s3, settings).store(source(data), spec(bucket, "big.zip", kind="zip"), stats=stats)
    assert stored.parts == 8 and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert calls.max_in_flight["UploadPart"] <= 2
    assert 5 * MIB < stats.peak_buffered_bytes <= 5 * MIB * (2 + 1) + CHUNK
    assert stats.buffered_bytes == 0


async def test_part_buffers_are_reused(aws: AwsClients, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many parts, at most parts_in_flight + 1 buffers are ever filled (each part is copied into memory
    already touched), and every byte still lands in order."""
    handed_out: list[bytearray] = []  # kept alive, so identities stay distinct
    take = multipart._PartBuffers.take

    def recording_take(self: Any, size: int) -> bytearray:
        buf = take(self, size)
        handed_out.append(buf)
        return buf

    monkeypatch.setattr(multipart._PartBuffers, "take", recording_take)
    data = random.Random(3).randbytes(42 * MIB)
    engine = S3Transfer(aws.s3, s3_settings(parts_in_flight=2))
    stored = await engine.store(source(data), spec(bucket, "r.zip", kind="zip"))
    assert stored.parts == 9 and len(handed_out) == 9
    assert len({id(b) for b in handed_out}) <= 3
    body = await (await aws.s3.get_object(Bucket=bucket, Key="r.zip"))["Body"].read()
    assert body == data


def test_part_body_is_a_seekable_file_and_an_aiohttp_payload() -> None:
    data = bytes(range(256)) * 8
    body = multipart._PartBody(memoryview(bytearray(data)))
    assert len(body) == body.size == len(data) and body.tell() == 0
    assert body.read(10) == data[:10] and body.tell() == 10
    assert body.read() == data[10:] and body.read() == b""
    assert body.seek(0) == 0 and body.read(-1) == data
    assert body.seek(-5, 2) == len(data) - 5 and body.read() == data[-5:]
    assert body.seek(3, 1) == len(data)  # clamped at the end


async def test_unknown_length_and_sse(aws: AwsClients, bucket: str) -> None:
    data = csv_data(rows_for(6 * MIB))
    transfer = S3Transfer(aws.s3, s3_settings(sse="AES256"))
    stored = await transfer.store(source(data, declared=None), spec(bucket))
    assert stored.parts == 2 and stored.size == len(data)
    head = await aws.s3.head_object(Bucket=bucket, Key="out/file.csv")
    assert head["ServerSideEncryption"] == "AES256"


# -- gzip ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [300_000, 7 * MIB])
async def test_gzip_transport_stored_decoded(aws: AwsClients, bucket: str, size: int) -> None:
    data = csv_data(rows_for(size))
    n = data.count(b"\n") - 1
    wire = gzip.compress(data, 6)
    stored = await S3Transfer(aws.s3, s3_settings()).store(
        source(wire, encoding="gzip"), spec(bucket, expected_records=n)
    )
    body, resp = await read(aws, bucket, "out/file.csv")
    assert body == data and stored.size == len(data) and stored.record_count == n
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert resp["ContentType"] == "text/csv; charset=utf-8" and resp.get("ContentEncoding") is None


async def test_gzip_transport_stored_as_gzip_is_verified_too(aws: AwsClients, bucket: str) -> None:
    data = csv_data(20_000)
    wire = gzip.compress(data)
    transfer = S3Transfer(aws.s3, s3_settings())
    stored = await transfer.store(
        source(wire, encoding="gzip"), spec(bucket, "f.csv.gz", expected_records=20_000, store_gzip=True)
    )
    body, resp = await read(aws, bucket, "f.csv.gz")
    assert body == wire and stored.sha256 == hashlib.sha256(wire).hexdigest() and stored.record_count == 20_000
    assert resp["ContentType"] == "application/gzip" and stored.content_type == "application/gzip"

    with pytest.raises(IntegrityError, match="record count 20000 != expected 5"):
        await transfer.store(
            source(wire, encoding="gzip"), spec(bucket, "g.csv.gz", expected_records=5, store_gzip=True)
        )
    with pytest.raises(IntegrityError, match="record count 20000 != expected 5"):
        await transfer.store(source(wire, encoding="gzip"), spec(bucket, "g.csv", expected_records=5))
    listed = await aws.s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["f.csv.gz"]


async def test_plain_source_gzipped_when_asked(aws: AwsClients, bucket: str) -> None:
    data = csv_data(rows_for(6 * MIB))
    stored = await S3Transfer(aws.s3, s3_settings()).store(source(data), spec(bucket, "p.csv.gz", store_gzip=True))
    body, _ = await read(aws, bucket, "p.csv.gz")
    assert gzip.decompress(body) == data and stored.size == len(body) < len(data)
    assert stored.sha256 == hashlib.sha256(body).hexdigest() and stored.record_count == data.count(b"\n") - 1


async def test_multi_member_gzip_and_truncated_gzip(aws: AwsClients, bucket: str) -> None:
    data = csv_data(5000)
    half = data.index(b"\n", len(data) // 2) + 1
    wire = gzip.compress(data[:half]) + gzip.compress(data[half:])
    transfer = S3Transfer(aws.s3, s3_settings())
    stored = await transfer.store(source(wire, encoding="gzip"), spec(bucket, expected_records=5000))
    assert stored.size == len(data)
    cut = gzip.compress(data)[:-20]
    with pytest.raises(IntegrityError, match="truncated") as truncated:
        await transfer.store(source(cut, encoding="gzip"), spec(bucket, "t.csv"))
    assert truncated.value.retryable  # a cut no framing told of: a retry may get the whole file
    with pytest.raises(IntegrityError, match="not valid gzip") as invalid:
        await transfer.store(source(b"this is not gzip at all", encoding="gzip"), spec(bucket, "u.csv"))
    assert not invalid.value.retryable


async def test_zip_and_gzip_files_are_stored_as_delivered(aws: AwsClients, bucket: str) -> None:
    transfer = S3Transfer(aws.s3, s3_settings())
    blob = random.Random(3).randbytes(100_000)
    z = await transfer.store(source(blob, content_type="application/zip"), spec(bucket, "a.zip", kind="zip"))
    assert (z.content_type, z.record_count) == ("application/zip", None)
    assert (await read(aws, bucket, "a.zip"))[0] == blob

    inner = csv_data(3000)
    gz = gzip.compress(inner)
    g = await transfer.store(
        source(gz, content_type="application/x-gzip"), spec(bucket, "b.csv.gz", kind="gzip", expected_records=3000)
    )
    assert (g.content_type, g.record_count, g.size) == ("application/gzip", 3000, len(gz))
    assert (await read(aws, bucket, "b.csv.gz"))[0] == gz
    with pytest.raises(IntegrityError, match="record count"):
        await transfer.store(source(gz), spec(bucket, "c.csv.gz", kind="gzip", expected_records=1))


# -- failures leave nothing behind -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [100_000, 12 * MIB])
async def test_short_or_long_source_is_integrity_error(aws: AwsClients, bucket: str, size: int) -> None:
    data = random.Random(4).randbytes(size)
    transfer = S3Transfer(aws.s3, s3_settings())
    with pytest.raises(IntegrityError, match=f"received {size - 1000} bytes, {size} declared"):
        await transfer.store(source(data[:-1000], declared=size), spec(bucket, kind="zip"))
    with pytest.raises(IntegrityError, match="more than the declared"):
        await transfer.store(source(data, declared=size - 1000), spec(bucket, kind="zip"))
    await assert_nothing_left(aws, bucket, "out/file.csv")


async def test_source_error_passes_through_and_aborts(aws: AwsClients, bucket: str) -> None:
    data = csv_data(rows_for(12 * MIB))
    boom = AquaUnavailable("connection reset")
    calls = S3Calls(aws.s3)
    it = chunks(data, fail_at=11 * MIB, exc=boom)
    with pytest.raises(AquaUnavailable) as info:
        await S3Transfer(aws.s3, s3_settings()).store(source(data, it=it), spec(bucket))
    assert info.value is boom
    assert calls.ops["UploadPart"] >= 1 and calls.ops["AbortMultipartUpload"] == 1
    await assert_nothing_left(aws, bucket, "out/file.csv")


@pytest.mark.parametrize("size", [50_000, 12 * MIB])
async def test_record_count_mismatch_leaves_nothing(aws: AwsClients, bucket: str, size: int) -> None:
    data = csv_data(rows_for(size))
    n = data.count(b"\n") - 1
    with pytest.raises(IntegrityError, match=f"record count {n} != expected {n + 1}"):
        await S3Transfer(aws.s3, s3_settings()).store(source(data), spec(bucket, expected_records=n + 1))
    await assert_nothing_left(aws, bucket, "out/file.csv")


@pytest.mark.parametrize(
    ("bad", "message"),
    [(b"1,2\n", "has 2 fields, header has 3"), (b'1,"x\x00",3\n', "NUL byte at offset"), (b'1,2,"open\n', "quoted")],
)
@pytest.mark.parametrize("size", [50_000, 11 * MIB])
async def test_broken_csv_is_rejected(aws: AwsClients, bucket: str, size: int, bad: bytes, message: str) -> None:
    data = csv_data(rows_for(size)) + bad
    with pytest.raises(IntegrityError, match=message):
        await S3Transfer(aws.s3, s3_settings()).store(source(data), spec(bucket))
    await assert_nothing_left(aws, bucket, "out/file.csv")


async def test_verification_can_be_switched_off(aws: AwsClients, bucket: str) -> None:
    data = b"a,b\n1\n\x00\n"
    settings = s3_settings(verify_record_count=False, verify_csv_shape=False)
    stored = await S3Transfer(aws.s3, settings).store(source(data), spec(bucket, expected_records=99))
    assert stored.record_count is None and stored.size == len(data)


async def test_unsupported_content_encoding(aws: AwsClients, bucket: str) -> None:
    with pytest.raises(IntegrityError, match="unsupported Content-Encoding"):
        await S3Transfer(aws.s3, s3_settings()).store(source(b"a\n", encoding="br"), spec(bucket))


@pytest.mark.parametrize("size", [1000, 12 * MIB])
async def test_missing_bucket_is_storage_error(aws: AwsClients, unique: str, size: int) -> None:
    data = random.Random(5).randbytes(size)
    with pytest.raises(StorageError, match="NoSuchBucket") as info:
        await S3Transfer(aws.s3, s3_settings()).store(source(data), spec(f"missing-{unique}", kind="zip"))
    assert info.value.retryable


async def test_part_upload_failure_is_storage_error_and_aborts(aws: AwsClients, bucket: str) -> None:
    """The upload is aborted behind our back mid-stream (as a lifecycle rule might): UploadPart fails."""
    data = random.Random(6).randbytes(16 * MIB)

    async def chunks_then_sabotage() -> AsyncIterator[bytes]:
        async for c in chunks(data):
            yield c
            uploads = (await aws.s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
            for u in uploads:
                await aws.s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])

    with pytest.raises(StorageError, match="S3 UploadPart failed"):  # moto answers 500, S3 NoSuchUpload
        await S3Transfer(aws.s3, s3_settings()).store(source(data, it=chunks_then_sabotage()), spec(bucket, kind="zip"))
    await assert_nothing_left(aws, bucket, "out/file.csv")


async def test_cancellation_aborts_the_upload(aws: AwsClients, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")  # pipeline.transfer and pipeline.multipart
    reached = asyncio.Event()
    data = random.Random(7).randbytes(6 * MIB)

    async def stalls() -> AsyncIterator[bytes]:
        yield data  # more than one part: the multipart upload has started when we are resumed
        reached.set()
        await asyncio.Event().wait()
        yield b""  # pragma: no cover

    calls = S3Calls(aws.s3)
    task = asyncio.create_task(
        S3Transfer(aws.s3, s3_settings()).store(source(data, declared=None, it=stalls()), spec(bucket, kind="zip"))
    )
    await reached.wait()
    assert calls.ops["CreateMultipartUpload"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls.ops["AbortMultipartUpload"] == 1
    await assert_nothing_left(aws, bucket, "out/file.csv")
    assert "aborted multipart upload of s3://" in caplog.text


def fail_upload_part(s3: Any, number: int, exc: BaseException) -> Counter[int]:
    """Make UploadPart ``number`` raise ``exc`` before it is sent (botocore's ``before-call`` hook); returns the
    count of UploadPart calls by part number."""
    called: Counter[int] = Counter()

    def before(params: dict[str, Any], **_: Any) -> None:
        part = int(params["query_string"]["partNumber"])
        called[part] += 1
        if part == number:
            raise exc

    s3.meta.events.register("before-call.s3.UploadPart", before)
    return called


async def test_a_part_whose_upload_was_cancelled_is_never_completed_without(aws: AwsClients, bucket: str) -> None:
    """A part task cancelled from outside leaves no ETag and no failure: the upload must not be completed
    without it (S3 would accept the gap, and the object would be short of a part under a manifest that says
    otherwise)."""
    data = csv_data(rows_for(18 * MIB))  # four parts of 5 MiB
    fail_upload_part(aws.s3, 2, asyncio.CancelledError())
    with pytest.raises(StorageError, match=r"parts \[2\] were not uploaded"):
        await S3Transfer(aws.s3, s3_settings()).store(source(data), spec(bucket))
    await assert_nothing_left(aws, bucket, "out/file.csv")


async def test_no_part_is_shipped_after_one_failed(aws: AwsClients, bucket: str) -> None:
    """One part in flight: part 1 fails, and the writer it wakes sees that before it ships part 2."""
    data = random.Random(8).randbytes(16 * MIB)
    error = StorageError("S3 UploadPart failed: injected")
    called = fail_upload_part(aws.s3, 1, error)
    with pytest.raises(StorageError, match="injected"):
        await S3Transfer(aws.s3, s3_settings(parts_in_flight=1)).store(source(data), spec(bucket, kind="zip"))
    assert called == {1: 1}, called
    await assert_nothing_left(aws, bucket, "out/file.csv")


async def test_cancelled_while_s3_makes_the_upload_leaves_no_upload(aws: AwsClients, bucket: str) -> None:
    """Cancelled after S3 made the multipart upload but before its answer was read: the upload is still aborted
    (its id was unknown, so it used to stay open until a lifecycle rule removed it)."""
    made = asyncio.Event()

    async def slow_answer(**_: Any) -> None:
        made.set()
        await asyncio.sleep(0.5)

    aws.s3.meta.events.register("after-call.s3.CreateMultipartUpload", slow_answer)
    data = random.Random(9).randbytes(6 * MIB)
    task = asyncio.create_task(S3Transfer(aws.s3, s3_settings()).store(source(data), spec(bucket, kind="zip")))
    await made.wait()
    assert (await aws.s3.list_multipart_uploads(Bucket=bucket)).get("Uploads")  # S3 has made it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_nothing_left(aws, bucket, "out/file.csv")


async def test_stale_uploads_of_exactly_the_key_are_aborted(aws: AwsClients, bucket: str) -> None:
    """What a killed worker left under the key goes; an upload of a longer key with the same prefix stays."""
    key = "out/file.csv"
    for k in (key, key, key, key + ".gz"):
        await aws.s3.create_multipart_upload(Bucket=bucket, Key=k)
    assert await S3Transfer(aws.s3, s3_settings()).abort_stale_uploads(bucket, key) == 3
    left = (await aws.s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", [])
    assert [u["Key"] for u in left] == [key + ".gz"]
