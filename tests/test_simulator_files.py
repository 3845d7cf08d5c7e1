"""Simulator result files: content options, formats, compression, retention, size limit and file faults."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from pipeline.aqua.simulator import SimulatorConfig, aiter_file
from pipeline.aqua.simulator.data import FileSpec, iter_text, text_size
from pipeline.aqua.validation import parse_zoql
from tests.test_simulator import ACCOUNT_QUERY, Sim, make_sim

__all__ = ["make_sim"]

SimFactory = Callable[..., Awaitable[Sim]]


def table(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


async def one_file(s: Sim, **body: Any) -> tuple[str, dict[str, Any]]:
    queries = body.pop("queries", [ACCOUNT_QUERY])
    job = await s.finished((await s.submit({"queries": queries, **body}))["id"])
    return job["batches"][0]["fileId"], job


async def test_labels_null_replacement_and_time_zone(make_sim: SimFactory) -> None:
    s = await make_sim()
    q = {"name": "Sub", "query": "select Id, SubscriptionEndDate, Notes, UpdatedDate, Account.Name from Subscription"}
    fid, _ = await one_file(s, queries=[q], useQueryLabels="false", nullReplacement="NULL", dateTimeUtc=False)
    _, data = await s.download(fid)
    rows = table(data)
    assert rows[0] == ["Subscription: ID", "Subscription: Subscription End Date", "Subscription: Notes",
                       "Subscription: Updated Date", "Account: Name"]  # fmt: skip
    assert any(r[1] == "NULL" for r in rows[1:]) and any(r[1] != "NULL" for r in rows[1:])
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d-0800", r[3]) for r in rows[1:])
    fid, _ = await one_file(s, queries=[q], useQueryLabels=True, dateTimeUtc="true")
    _, data = await s.download(fid)
    rows = table(data)
    assert rows[0] == ["Subscription.Id", "Subscription.SubscriptionEndDate", "Subscription.Notes",
                       "Subscription.UpdatedDate", "Account.Name"]  # fmt: skip
    assert all(r[3].endswith("+0000") for r in rows[1:])
    assert any(r[1] == "" for r in rows[1:])


async def test_csv_quoting_is_exercised_and_rectangular(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, _ = await one_file(s, queries=[{"name": "A", "query": "select * from Account"}])
    _, data = await s.download(fid)
    rows = table(data)
    assert len({len(r) for r in rows}) == 1 and len(rows) == 1001
    cells = [c for r in rows for c in r]
    assert any("\n" in c for c in cells) and any('"' in c for c in cells) and any("," in c for c in cells)


async def test_transport_gzip_only_when_asked(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, _ = await one_file(s)
    plain_resp, plain = await s.download(fid)
    assert "Content-Encoding" not in plain_resp.headers
    resp, wire = await s.download(fid, **{"Accept-Encoding": "gzip, deflate"})
    assert resp.headers["Content-Encoding"] == "gzip" and "Content-Length" not in resp.headers
    assert resp.headers["Content-Type"] == "text/csv;charset=UTF-8"
    assert gzip.decompress(wire) == plain


async def test_small_file_is_not_transport_compressed(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, rows={"Account": 2}))
    fid, _ = await one_file(s)
    resp, _ = await s.download(fid, **{"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in resp.headers


async def test_gzip_and_zip_formats(make_sim: SimFactory) -> None:
    s = await make_sim()
    csv_id, _ = await one_file(s)
    _, plain = await s.download(csv_id)
    gz_id, job = await one_file(s, format="GZIP")
    assert job["format"] == "GZIP"
    resp, gz = await s.download(gz_id, **{"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Type"] == "application/x-gzip;charset=UTF-8"
    assert "Content-Encoding" not in resp.headers and int(resp.headers["Content-Length"]) == len(gz)
    assert gzip.decompress(gz) == plain
    zip_id, _ = await one_file(s, format="zip")
    resp, zdata = await s.download(zip_id)
    assert resp.headers["Content-Type"] == "application/zip;charset=UTF-8"
    with zipfile.ZipFile(io.BytesIO(zdata)) as zf:
        assert zf.namelist() == ["Account.csv"]
        assert zf.read("Account.csv") == plain
    _, again = await s.download(zip_id)
    assert again == zdata


async def test_tsv_format(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, job = await one_file(s, format="tsv", useQueryLabels=True)
    resp, data = await s.download(fid)
    assert job["format"] == "TSV" and resp.headers["Content-Type"].startswith("text/tab-separated-values")
    rows = list(csv.reader(io.StringIO(data.decode(), newline=""), delimiter="\t"))
    assert rows[0] == ["Account.Id", "Account.Name", "Account.Balance", "Account.UpdatedDate"]


async def test_retention_and_over_limit(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, max_file_bytes=10_000))
    fid, _ = await one_file(s)
    resp, body = await s.download(fid)
    assert resp.status == 403 and body == b"<security:max-object-size>2047MB</security:max-object-size>"
    s.sim.config.max_file_bytes = 2047 * 1024 * 1024
    assert (await s.download(fid))[0].status == 200
    s.sim.faults.files_over_limit = [fid]
    assert (await s.download(fid))[0].status == 403
    s.sim.faults.files_over_limit = False
    s.sim.clock.advance(72 * 3600 + 1)
    await s.login()
    resp, body = await s.download(fid)
    assert resp.status == 404


async def test_file_request_faults_can_target_files_only(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, job = await one_file(s)
    s.sim.faults.rate_limit_next = 1
    s.sim.faults.rate_limit_scope = "files"
    s.sim.faults.retry_after_s = 3
    assert (await s.job(job["id"]))["status"] == "completed"
    resp, _ = await s.download(fid)
    assert resp.status == 429 and resp.headers["Retry-After"] == "3"
    assert (await s.download(fid))[0].status == 200
    s.sim.faults.server_error_next = 2
    s.sim.faults.server_error_scope = "api"
    assert (await s.download(fid))[0].status == 200
    async with s.http.get(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as r:
        assert r.status == 503
    async with s.http.get(s.url(f"/v1/batch-query/jobs/{job['id']}"), headers=s.auth) as r:
        assert r.status == 503
    assert (await s.job(job["id"]))["status"] == "completed"
    s.sim.faults.fail_file_next = 1
    resp, body = await s.download(fid)
    assert resp.status == 500 and b"SystemError" in body
    assert (await s.download(fid))[0].status == 200


async def test_cut_file_mid_body(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, _ = await one_file(s)
    _, full = await s.download(fid)
    s.sim.faults.cut_file_after_bytes = 1000
    s.sim.faults.cut_file_next = 1
    got = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async with s.http.get(s.url(f"/v1/files/{fid}"), headers={**s.auth, "Accept-Encoding": "identity"}) as resp:
            assert int(resp.headers["Content-Length"]) == len(full)
            async for chunk in resp.content.iter_chunked(256):
                got += chunk
    assert bytes(got) == full[:1000]
    assert s.sim.faults.cut_file_after_bytes is None
    assert (await s.download(fid))[1] == full


async def test_wrong_content_length(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, _ = await one_file(s)
    _, full = await s.download(fid)
    s.sim.faults.wrong_content_length = True
    with pytest.raises(aiohttp.ClientPayloadError):
        async with s.http.get(s.url(f"/v1/files/{fid}"), headers={**s.auth, "Accept-Encoding": "identity"}) as resp:
            assert int(resp.headers["Content-Length"]) > len(full)
            await resp.read()


async def test_trickle_delivers_same_bytes(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, rows={"Account": 3}))
    fid, _ = await one_file(s)
    _, full = await s.download(fid)
    s.sim.faults.trickle_bytes_per_s = 10_000
    assert (await s.download(fid))[1] == full


async def test_async_iterator_and_digest_match_download(make_sim: SimFactory) -> None:
    s = await make_sim()
    fid, _ = await one_file(s, format="gzip")
    _, wire = await s.download(fid)
    streamed = b"".join([c async for c in aiter_file(s.sim, fid)])
    assert streamed == wire
    assert (await s.sim.digest(s.sim.files[fid]))[1] == hashlib.sha256(wire).hexdigest()


def test_generator_throughput_functional() -> None:
    """Large files stream in ~512 KiB chunks and their size is known up front (no timing assertion)."""
    spec = FileSpec("a" * 32, "Account", parse_zoql("select * from Account").columns, start=0, end=150_000)
    expected = text_size(42, spec)
    sizes = [len(c) for c in iter_text(42, spec)]
    assert sum(sizes) == expected > 20_000_000
    assert max(sizes) <= 2 * 1024 * 1024 and len(sizes) > 10
    seg = FileSpec("b" * 32, "Account", spec.columns, start=1234, end=5678)
    data = b"".join(iter_text(42, seg))
    assert len(data) == text_size(42, seg)
    first = table(data)[1][0]
    assert first.endswith(f"{1:012x}{234:012x}")  # row 1234 = block 1, row 234
    assert zlib.crc32(data) == zlib.crc32(b"".join(iter_text(42, seg)))
