"""Hostile input against the live service on loopback: fuzzed callbacks (hypothesis), oversized request lines,
headers and bodies, slow-loris connections, and path-traversal / URL-injection attempts in ids.

Never a 5xx, never an enqueue or a ledger write without a valid token, nothing fetched from any host but the
configured AQuA base URL, and the service keeps answering other clients while slow ones hang around.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from pipeline.settings import Settings
from pipeline.testing.moto import MotoServer, free_port
from pipeline.testing.procs import ServiceProcess
from pipeline.testing.stack import Stack, running_stack
from tests.test_callback_security import callback_counts

T = TypeVar("T")
ADMIN_TOKEN = "hostile-admin-token-5c2e"


def with_admin(s: Settings) -> Settings:
    return s.model_copy(update={"security": s.security.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)})})


class BackgroundStack:
    """``running_stack`` on its own event loop in a thread, for synchronous tests (hypothesis, schemathesis).

    ``run(fn)`` runs ``fn(stack, http)`` on that loop (``http`` is an aiohttp session owned by the loop) and
    returns its result.
    """

    def __init__(self, moto_url: str, **stack_kw: Any) -> None:
        self._moto_url = moto_url
        self._stack_kw = stack_kw
        self._thread = threading.Thread(target=self._main, name="background-stack", daemon=True)
        self._ready: Future[None] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.stack: Stack | None = None
        self.http: aiohttp.ClientSession | None = None

    def __enter__(self) -> BackgroundStack:
        self._thread.start()
        self._ready.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "background stack did not stop"

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to the test through the ready future
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_stack(self._moto_url, **self._stack_kw) as stack, aiohttp.ClientSession() as http:
            self.stack, self.http = stack, http
            self._ready.set_result(None)
            await self._stop.wait()

    @property
    def url(self) -> str:
        assert self.stack is not None
        return self.stack.service_url

    def run(self, fn: Callable[[Stack, aiohttp.ClientSession], Awaitable[T]], timeout_s: float = 20) -> T:
        assert self._loop is not None and self.stack is not None and self.http is not None
        stack, http = self.stack, self.http

        async def call() -> T:
            return await fn(stack, http)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=timeout_s)


@pytest.fixture(scope="module")
def bg(moto_server: MotoServer) -> Iterator[BackgroundStack]:
    """One live service (worker off: an enqueue would stay visible in the queue) shared by the fuzz tests."""
    with BackgroundStack(moto_server.url, tweak=with_admin, run_worker=False) as stack:
        yield stack


async def nothing_recorded(stack: Stack, _: aiohttp.ClientSession) -> tuple[int, int]:
    """(work queue depth, ledger items)."""
    return await stack.components.queue.depth(), len(await stack.components.ledger.list_recent(500))


# -- hypothesis against the callback route -----------------------------------------------------------

_HOP = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te", "trailer"}
_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_keys = st.one_of(
    st.sampled_from(["jobId", "JOBID", "job_id", "status", "token", "Aqua.JobId", "aqua.jobstatus", "id", "secret"]),
    _printable,
)
_values = st.one_of(
    st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    st.sampled_from(["Completed", "completed", "../../etc/passwd", "%2e%2e%2f", "v1.a.b.c.d", "${JOBID}", ""]),
    st.text(max_size=120),
    st.text(st.characters(codec="utf-8"), min_size=500, max_size=700),
)
_header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,30}", fullmatch=True).filter(lambda h: h.lower() not in _HOP)
_requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST"]),
        "query": st.lists(st.tuples(_keys, _values), max_size=6),
        "headers": st.dictionaries(
            st.one_of(
                st.sampled_from(
                    ["Authorization", "X-Forwarded-For", "Zuora-Notification-Id", "X-Aqua-Pipeline-Secret"]
                ),
                _header_names,
            ),
            _printable,
            max_size=5,
        ),
        "content_type": st.sampled_from(
            ["application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]
        ),
        "body": st.one_of(
            st.binary(max_size=300),
            st.dictionaries(_keys, _values, max_size=5).map(lambda d: repr(d).replace("'", '"').encode()),
            st.just(b'{"Aqua.JobId": "' + b"a" * 32 + b'", "Aqua.JobStatus": "Completed"}'),
        ),
    }
)


@settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(req=_requests)
def test_fuzzed_callbacks_never_5xx_and_never_enqueue(bg: BackgroundStack, req: dict[str, Any]) -> None:
    target = "/callbacks/aqua" + ("?" + urllib.parse.urlencode(req["query"]) if req["query"] else "")

    async def send(stack: Stack, http: aiohttp.ClientSession) -> tuple[int, str, bytes, int]:
        assert stack.settings.http.callback_path == "/callbacks/aqua"
        url = stack.service_url + target
        headers = dict(req["headers"])
        kw: dict[str, Any] = {"headers": headers}
        if req["method"] == "POST":
            headers["Content-Type"] = req["content_type"]
            kw["data"] = req["body"]
        async with http.request(req["method"], url, **kw) as resp:
            wire = len(resp.request_info.url.raw_path_qs)  # the client re-quotes: this is what was sent
            return resp.status, resp.content_type, await resp.read(), wire

    status, ctype, body, wire = bg.run(send)
    assert 400 <= status < 500, (status, body[:300])
    if wire > 8190:  # refused by aiohttp's HTTP parser before any route runs: plain text
        assert (status, ctype) == (400, "text/plain"), (status, ctype, body[:300])
    else:
        assert ctype == "application/json", (wire, status, ctype, body[:300])
    assert bg.run(nothing_recorded) == (0, 0)


# -- ids carrying traversal and URL injection ----------------------------------------------------------

HOSTILE_IDS = [
    "../../../../etc/passwd",
    "..%2f..%2fadmin",
    "%2e%2e%2f%2e%2e%2f",
    "0123456789abcdef0123456789abcdef/../../x",
    "0123456789abcdef0123456789abcdef?x=1",
    "0123456789abcdef0123456789abcdef#frag",
    "0123456789abcdef0123456789abcdef@{evil}",
    "@{evil}/0123456789abcdef0123456789abcdef",
    "http://{evil}/0123456789abcdef0123456789abcdef",
    "//{evil}/x",
    "0123456789abcdef0123456789abcdef\r\nX-Injected: 1",
    "0123456789abcdef0123456789abcdef%0d%0aX-Injected:%201",
    "0123456789abcdef0123456789abcde\u0130",
    "0123456789ABCDEF0123456789ABCDEF0",
]


@asynccontextmanager
async def evil_host() -> AsyncIterator[tuple[str, list[str]]]:
    """A server standing in for an attacker's host; records every request it gets."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(str(request.rel_url))
        return web.Response(text="{}", content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}", hits
    finally:
        await runner.cleanup()


async def test_hostile_ids_are_refused_and_nothing_is_fetched_elsewhere(moto_server: MotoServer) -> None:
    async with (
        running_stack(moto_server.url, tweak=with_admin, run_worker=False) as stack,
        evil_host() as (
            evil,
            hits,
        ),
    ):
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        base = stack.service_url
        statuses: list[tuple[str, int]] = []
        async with aiohttp.ClientSession() as http:
            for raw in HOSTILE_IDS:
                hostile = raw.format(evil=evil)
                quoted = urllib.parse.quote(hostile, safe="")
                requests: list[tuple[str, str]] = [
                    ("GET", f"{base}{stack.settings.http.callback_path}?jobId={quoted}&status=completed&token=x"),
                    ("POST", f"{base}{stack.settings.http.callback_path}?jobId={quoted}"),
                    ("GET", f"{base}/admin/jobs/{quoted}"),
                    ("DELETE", f"{base}/admin/jobs/{quoted}"),
                    ("POST", f"{base}/admin/jobs/{quoted}/replay"),
                ]
                for method, url in requests:
                    async with http.request(method, url, headers=auth) as resp:
                        statuses.append((f"{method} {url[len(base) :]}", resp.status))
                        assert resp.content_type == "application/json"
            # the same ids raw on the wire, unencoded (CRLF included), where the HTTP parser sees them
            for raw in HOSTILE_IDS:
                hostile = raw.format(evil=evil)
                for target in (f"{stack.settings.http.callback_path}?jobId={hostile}", f"/admin/jobs/{hostile}"):
                    status = await raw_status(stack, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    statuses.append((f"raw GET {target!r}", status))
        assert all(400 <= s < 500 for _, s in statuses), [x for x in statuses if not 400 <= x[1] < 500]
        assert hits == []  # nothing went to the attacker's host
        assert await stack.components.queue.depth() == 0
        assert await stack.components.ledger.list_recent(500) == []


# -- oversized input ----------------------------------------------------------------------------------


async def raw_status(stack: Stack, payload: bytes, *, timeout_s: float = 5) -> int:
    """Send raw bytes on a fresh connection; the status of the answer (0 if the server just closed)."""
    host, port = stack.service_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(payload)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout=timeout_s)
    except ConnectionError:
        return 0
    except TimeoutError:
        return -1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 else 0


async def test_oversized_request_lines_headers_and_bodies_are_refused(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, tweak=with_admin, run_worker=False) as stack:
        path = stack.settings.http.callback_path
        limit = stack.settings.http.max_body_bytes
        cases = {
            "long request line": f"GET {path}?jobId={'a' * 20000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            "long query (under the line limit)": f"GET {path}?pad={'a' * 8150} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            "huge header": f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 20000}\r\n\r\n".encode(),
            "too many headers": (
                f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: v\r\n" for i in range(300)) + "\r\n"
            ).encode(),
            "declared body too large": (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {limit * 4}\r\n\r\n"
            ).encode()
            + b"{" * (limit * 4),
            "chunked body too large": (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + b"".join(b"%x\r\n%s\r\n" % (8192, b"x" * 8192) for _ in range(limit // 8192 + 4))
            + b"0\r\n\r\n",
            "bad content-length": f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode(),
            "smuggling: both lengths": (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ).encode(),
            "bare LF in header": f"GET {path} HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n".encode(),
            "NUL in header": f"GET {path} HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n".encode(),
        }
        results = {name: await raw_status(stack, payload, timeout_s=3) for name, payload in cases.items()}
        assert all(s in (400, 413, 414, 431) for s in results.values()), results
        assert results["declared body too large"] == 413
        assert results["chunked body too large"] == 413
        assert await stack.components.queue.depth() == 0


def with_admin_and_secret(s: Settings) -> Settings:
    s = with_admin(s)
    return s.model_copy(update={"security": s.security.model_copy(update={"shared_secret": SecretStr("s3cret")})})


async def test_credentials_that_are_not_utf8_are_refused_not_server_errors(moto_server: MotoServer) -> None:
    """Header bytes that are not UTF-8 reach the handlers as lone surrogates; comparing them must refuse the
    request (403, 401), not fail to encode them (500 and an error traceback in the log)."""
    async with running_stack(moto_server.url, tweak=with_admin_and_secret, run_worker=False) as stack:
        callback = f"GET {stack.settings.http.callback_path}?jobId={'a' * 32} HTTP/1.1\r\nHost: x\r\n".encode()
        for secret in (b"wrong", b"wr\xffong", b"\xc3\x28"):
            assert await raw_status(stack, callback + b"X-Aqua-Pipeline-Secret: " + secret + b"\r\n\r\n") == 403
        admin = b"GET /admin/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        for token in (b"wrong", b"\xff" + ADMIN_TOKEN.encode()):
            assert await raw_status(stack, admin + token + b"\r\n\r\n") == 401
        assert await stack.components.queue.depth() == 0


# -- slow clients ---------------------------------------------------------------------------------------


async def healthz_latencies(url: str, n: int, *, every_s: float = 0.1) -> list[float]:
    """``n`` sequential /healthz probes; their latencies (each bounded at 2 s)."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for _ in range(n):
            started = time.monotonic()
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            out.append(time.monotonic() - started)
            await asyncio.sleep(every_s)
    return out


async def test_slow_loris_clients_do_not_block_others(moto_server: MotoServer) -> None:
    async with running_stack(moto_server.url, run_worker=False) as stack:
        host, port = stack.service_url.removeprefix("http://").split(":")
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(100)]
        stop = asyncio.Event()

        async def drip(writer: asyncio.StreamWriter, i: int) -> None:
            writer.write(f"POST {stack.settings.http.callback_path} HTTP/1.1\r\nHost: x\r\n".encode())
            while not stop.is_set():
                writer.write(f"X-{i}: {'z' * 3}\r\n".encode())
                await writer.drain()
                await asyncio.sleep(0.2)

        drippers = [asyncio.create_task(drip(w, i)) for i, (_, w) in enumerate(conns)]
        try:
            latencies = await healthz_latencies(stack.service_url, 20)
        finally:
            stop.set()
            await asyncio.gather(*drippers, return_exceptions=True)
            for _, w in conns:
                w.close()
        # 100 slow clients hold connections open; every probe still answered, and promptly
        assert len(latencies) == 20
        assert max(latencies) < 1.0, latencies


def deadlines(*, idle_s: float, body_s: float) -> Callable[[Settings], Settings]:
    """``HTTP__IDLE_TIMEOUT_S`` and ``HTTP__BODY_TIMEOUT_S`` (and the admin token)."""

    def tweak(s: Settings) -> Settings:
        s = with_admin(s)
        return s.model_copy(
            update={"http": s.http.model_copy(update={"idle_timeout_s": idle_s, "body_timeout_s": body_s})}
        )

    return tweak


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it is still open after ``timeout_s``."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=timeout_s)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        return None


async def unfinished_headers_closed_after(url: str) -> float:
    """Open a connection to ``url``, drip header lines of a request that never ends; seconds until the server
    closed it without an answer (the test fails if it is still open after 5 s)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished

    async def drip() -> None:  # bytes of an unfinished request do not put the deadline off
        for i in range(100):
            writer.write(f"X-{i}: z\r\n".encode())
            await writer.drain()
            await asyncio.sleep(0.2)

    dripper = asyncio.create_task(drip())
    started = time.monotonic()
    try:
        data = await closed_within(reader, 5)
    finally:
        dripper.cancel()
        await asyncio.gather(dripper, return_exceptions=True)
        writer.close()
    assert data is not None, "the server kept a connection with unfinished headers open"
    assert data == b"", data  # closed without an answer
    return time.monotonic() - started


@pytest.mark.parametrize("server", ["in_process", "serve"])
async def test_a_client_that_never_finishes_its_headers_is_disconnected(
    moto_server: MotoServer, tmp_path: Path, server: str
) -> None:
    tweak = deadlines(idle_s=1, body_s=30)
    async with running_stack(
        moto_server.url, run_worker=False, tweak=tweak, start_service=server == "in_process"
    ) as stack:
        url = stack.service_url
        proc = None
        if server == "serve":  # the production entry point applies the setting too
            settings = stack.settings.model_copy(
                update={"http": stack.settings.http.model_copy(update={"port": free_port()})}
            )
            proc = ServiceProcess(settings, tmp_path / "serve.log").start()
            url = proc.url
        try:
            assert await unfinished_headers_closed_after(url) < 4
            # a whole request on a fresh connection is still served
            async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as resp:
                assert resp.status == 200
        finally:
            if proc is not None:
                proc.terminate()


@pytest.mark.parametrize("route", ["callback", "admin"])
async def test_a_body_that_stalls_gets_408_and_the_connection_closes(moto_server: MotoServer, route: str) -> None:
    async with running_stack(moto_server.url, run_worker=False, tweak=deadlines(idle_s=30, body_s=0.5)) as stack:
        if route == "callback":
            head = f"POST {stack.settings.http.callback_path}?jobId={'a' * 32}&status=Completed HTTP/1.1\r\n"
        else:
            head = f"POST /admin/jobs HTTP/1.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        payload = head + 'Host: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{"jobId": '
        host, port = stack.service_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()
        try:
            writer.write(payload.encode())  # 10 of the 200 bytes announced, then nothing
            await writer.drain()
            data = await closed_within(reader, 5)
        finally:
            writer.close()
        assert data is not None, "the server kept waiting for the body"
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert b"Connection: close" in data
        assert b'"error":"body_timeout"' in data
        assert time.monotonic() - started < 4
        assert await stack.components.queue.depth() == 0
        if route == "callback":
            async with aiohttp.ClientSession() as http:
                assert (await callback_counts(http, stack)).get("body_timeout") == 1
