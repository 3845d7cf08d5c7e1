"""``create_app(settings)``: the one factory that builds the service. Routes, middlewares and cleanup
contexts are attached here; every long-lived resource (HTTP session, AWS clients, worker, reconciler) is
owned by exactly one cleanup context and closed in reverse order (the worker drains before its clients
close). Tests, the CLI and the container all call this factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from pipeline.aqua.client import AquaClient
from pipeline.aws import AwsClients, open_clients
from pipeline.callback_auth import CallbackAuthenticator
from pipeline.callback_batch import TokenCallbackBatcher
from pipeline.callback_record import CallbackRecorder
from pipeline.callbacks import CallbackHandler, error_response, expect_handler, json_response
from pipeline.csvcheck import DEFAULT_ENGINE
from pipeline.errors import PipelineError
from pipeline.events import EventPublisher, build_publisher
from pipeline.ledger import JobLedger
from pipeline.manifest import ManifestStore
from pipeline.metrics import Metrics
from pipeline.processor import JobProcessor
from pipeline.reconciler import Reconciler
from pipeline.settings import Settings
from pipeline.submission import Submitter
from pipeline.tokens import TokenSigner
from pipeline.transfer import S3Transfer
from pipeline.worker import Worker
from pipeline.workqueue import WorkQueue

log = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything the routes, the worker and the reconciler use; built once per app."""

    settings: Settings
    aws: AwsClients
    http: aiohttp.ClientSession
    aqua: AquaClient
    ledger: JobLedger
    queue: WorkQueue
    publisher: EventPublisher
    manifests: ManifestStore
    transfer: S3Transfer
    processor: JobProcessor
    signer: TokenSigner


SETTINGS_KEY = web.AppKey("settings", Settings)
METRICS_KEY = web.AppKey("metrics", Metrics)
COMPONENTS_KEY = web.AppKey("components", Components)
CALLBACKS_KEY = web.AppKey("callbacks", CallbackHandler)
RECORDER_KEY = web.AppKey("callback_recorder", CallbackRecorder)
WORKER_KEY = web.AppKey("worker", Worker)
STATE_KEY = web.AppKey("state", dict)


async def build_components(settings: Settings, stack: AsyncExitStack, metrics: Metrics) -> Components:
    """Open every client on ``stack`` and wire the pipeline's parts."""
    aws = await open_clients(stack, settings.aws)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.aqua.connect_timeout_s, sock_read=settings.aqua.read_timeout_s
    )
    http = await stack.enter_async_context(
        aiohttp.ClientSession(timeout=timeout, auto_decompress=False, connector=aiohttp.TCPConnector(limit=100))
    )
    aqua = AquaClient(http, settings.aqua, on_retry=lambda cause: metrics.upstream_retries.labels(cause).inc())
    ledger = JobLedger(aws.dynamodb, settings.ledger)
    queue_url = settings.queue.work_queue_url
    if not queue_url:
        resp = await aws.sqs.get_queue_url(QueueName=settings.queue.work_queue_name)
        queue_url = str(resp["QueueUrl"])
    queue = WorkQueue(aws.sqs, queue_url, send_linger_s=settings.queue.send_linger_ms / 1000)
    publisher = build_publisher(aws, settings.events)
    manifests = ManifestStore.from_settings(aws.s3, settings.s3)
    transfer = S3Transfer(aws.s3, settings.s3)
    processor = JobProcessor(
        aqua=aqua,
        transfer=transfer,
        manifests=manifests,
        publisher=publisher,
        ledger=ledger,
        s3_settings=settings.s3,
        events_settings=settings.events,
        metrics=metrics,
    )
    signer = TokenSigner(settings.security.signing_keys, settings.security.token_ttl_s)
    return Components(settings, aws, http, aqua, ledger, queue, publisher, manifests, transfer, processor, signer)


def create_app(
    settings: Settings, *, run_worker: bool | None = None, run_reconciler: bool | None = None
) -> web.Application:
    """Build the service's aiohttp application."""
    app = web.Application(client_max_size=settings.http.max_body_bytes, middlewares=[error_middleware])
    metrics = Metrics()
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics
    app[STATE_KEY] = {"draining": False}
    worker_on = settings.queue.worker_enabled if run_worker is None else run_worker
    reconciler_on = settings.reconciler.enabled if run_reconciler is None else run_reconciler

    async def components_ctx(app: web.Application) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            c = app[COMPONENTS_KEY] = await build_components(settings, stack, metrics)
            fast_path = TokenCallbackBatcher(
                c.ledger,
                max_items=settings.ledger.callback_batch_items,
                max_calls=settings.ledger.callback_max_calls,
                linger_s=settings.ledger.callback_linger_ms / 1000,
            )
            recorder = app[RECORDER_KEY] = CallbackRecorder(c.ledger, fast_path, metrics=metrics)
            app[CALLBACKS_KEY] = CallbackHandler(
                authenticator=CallbackAuthenticator(settings.security, c.signer),
                recorder=recorder,
                queue=c.queue,
                metrics=metrics,
                defer_token_callbacks=settings.ledger.token_callbacks_at == "worker",
                body_timeout_s=settings.http.body_timeout_s,
            )
            yield

    async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
        c = app[COMPONENTS_KEY]
        if DEFAULT_ENGINE != "c" and (settings.s3.verify_record_count or settings.s3.verify_csv_shape):
            log.warning(
                "CSV verification runs on its pure-Python engine (pipeline._csvscan is not built or"
                " AQUA_PIPELINE_NO_EXTENSIONS is set): about 6x the CPU per GiB of the C engine"
            )
        worker = Worker(
            queue=c.queue,
            process=c.processor.process,
            settings=settings.queue,
            metrics=metrics,
            lease_extender=c.ledger.extend_lease,
            ledger_release=c.ledger.release,
            admit=app[RECORDER_KEY].admit,  # always: another replica may defer what this one would not
        )
        app[WORKER_KEY] = worker
        worker.start()
        yield
        await worker.stop(settings.http.shutdown_grace_s)

    async def reconciler_ctx(app: web.Application) -> AsyncIterator[None]:
        c = app[COMPONENTS_KEY]
        reconciler = Reconciler(
            ledger=c.ledger,
            aqua=c.aqua,
            queue=c.queue,
            settings=settings.reconciler,
            metrics=metrics,
            submitter=Submitter(aqua=c.aqua, ledger=c.ledger, signer=c.signer, http=settings.http),
        )
        task = asyncio.create_task(reconciler.run_forever(), name="reconciler")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(components_ctx)
    if worker_on:
        app.cleanup_ctx.append(worker_ctx)
    if reconciler_on:
        app.cleanup_ctx.append(reconciler_ctx)

    async def on_shutdown(app: web.Application) -> None:
        app[STATE_KEY]["draining"] = True

    app.on_shutdown.append(on_shutdown)
    add_routes(app, settings)
    return app


def add_routes(app: web.Application, settings: Settings) -> None:
    """The public routes: callbacks, health, readiness, metrics; the admin API under /admin/."""

    async def callback(request: web.Request) -> web.StreamResponse:
        return await request.app[CALLBACKS_KEY](request)

    app.router.add_route("GET", settings.http.callback_path, callback, expect_handler=expect_handler)
    app.router.add_route("POST", settings.http.callback_path, callback, expect_handler=expect_handler)
    app.router.add_get("/healthz", healthz, expect_handler=expect_handler)
    app.router.add_get("/readyz", readyz, expect_handler=expect_handler)
    app.router.add_get("/metrics", metrics_route, expect_handler=expect_handler)
    try:
        from pipeline.admin import add_admin_routes
    except ImportError:  # pragma: no cover - the admin API is optional at this stage
        return
    add_admin_routes(app, settings)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process is up and its loop answers."""
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining, and the queue, the ledger and the bucket answer."""
    if request.app[STATE_KEY]["draining"]:
        return json_response(503, {"status": "draining"})
    c = request.app.get(COMPONENTS_KEY)
    if c is None:
        return json_response(503, {"status": "starting"})
    checks: dict[str, str] = {}

    async def probe(name: str, op: Callable[[], Awaitable[object]]) -> None:
        try:
            await asyncio.wait_for(op(), timeout=3)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready
            checks[name] = f"error: {type(exc).__name__}"

    await asyncio.gather(
        probe("queue", c.queue.depth),
        probe("ledger", c.ledger.ping),
        probe("s3", lambda: c.aws.s3.head_bucket(Bucket=c.settings.s3.bucket)),
    )
    ok = all(v == "ok" for v in checks.values())
    return json_response(200 if ok else 503, {"status": "ready" if ok else "not_ready", "checks": checks})


async def metrics_route(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON; no tracebacks to clients."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        codes = {404: "not_found", 405: "method_not_allowed", 408: "body_timeout", 413: "payload_too_large"}
        code = codes.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except PipelineError as exc:
        log.warning("request failed: %s", exc)
        return error_response(503 if exc.retryable else 400, exc.reason, str(exc))
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error")


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log without query strings: callback tokens and secrets travel there and must not be logged."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %s %.4fs", request.remote, request.method, request.path, response.status, time)


def make_runner(
    app: web.Application,
    *,
    shutdown_timeout: float = 60.0,
    idle_timeout_s: float = 75.0,
    body_timeout_s: float = 10.0,
) -> web.AppRunner:
    """The AppRunner every server of ours uses (path-only access log, our own signal handling).

    ``idle_timeout_s`` is aiohttp's keep-alive timeout, which also bounds a client that never finishes its request
    headers: a connection is closed once it has waited that long, since it opened or since its last response,
    without a whole request (bytes of an unfinished one do not extend it). aiohttp's own default for an AppRunner
    is an hour. ``body_timeout_s`` is how long, after answering a request whose body was not read to its end (a
    408, say), the server still reads and discards the rest before it closes the connection (aiohttp's lingering
    time), so a client still sending can read the answer.
    """
    return web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=idle_timeout_s,
        lingering_time=body_timeout_s,
        access_log_class=PathOnlyAccessLogger,
    )


def serve(settings: Settings) -> None:
    """Run the service until SIGTERM/SIGINT, then shut down gracefully (see :func:`drain`)."""
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = make_runner(
        app,
        shutdown_timeout=min(settings.http.shutdown_grace_s, _REQUEST_DRAIN_S),
        idle_timeout_s=settings.http.idle_timeout_s,
        body_timeout_s=settings.http.body_timeout_s,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http.host, settings.http.port).start()
    except BaseException as exc:
        # the port is taken (say): the worker and reconciler already started, so stop them the graceful way
        await runner.cleanup()
        if isinstance(exc, OSError):
            raise OSError(
                exc.errno,
                f"cannot listen on {settings.http.host}:{settings.http.port} (AQUA_PIPELINE_HTTP__HOST, "
                f"AQUA_PIPELINE_HTTP__PORT): {exc.strerror or exc}",
            ) from exc
        raise
    log.info("serving on %s:%d", settings.http.host, settings.http.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)  # a second signal now kills the process the default way
    await drain(app, runner, settings)
    log.info("stopped")


_REQUEST_DRAIN_S = 10.0
"""How long closing the listener waits for in-flight HTTP requests (callbacks answer in milliseconds)."""


async def drain(app: web.Application, runner: web.AppRunner, settings: Settings) -> None:
    """Graceful shutdown, in order:

    1. ``/readyz`` answers 503 and the worker stops receiving; in-flight jobs keep running. The grace period
       (``http.shutdown_grace_s``) for those jobs starts now.
    2. For ``http.drain_delay_s`` callbacks are still served, so the load balancer can deregister the target.
    3. The listener closes (in-flight requests get up to 10 s).
    4. The worker waits for what is left of the grace period, then cancels unfinished jobs: each aborts its
       multipart upload, makes its message visible again and releases its ledger lease.
    5. The AWS clients and the HTTP session close (cleanup contexts, in reverse order).
    """
    grace = settings.http.shutdown_grace_s
    log.info(
        "shutting down: readiness fails; callbacks served for %.0fs; jobs get %.0fs", settings.http.drain_delay_s, grace
    )
    app[STATE_KEY]["draining"] = True
    worker = app.get(WORKER_KEY)
    stopping = asyncio.create_task(worker.stop(grace)) if worker is not None else None
    await asyncio.sleep(settings.http.drain_delay_s)
    await _close_sites(runner)
    if stopping is not None:
        await stopping
    await runner.cleanup()


async def _close_sites(runner: web.AppRunner) -> None:
    """Stop accepting connections on every site of ``runner`` (requests already in flight continue)."""
    for site in list(runner.sites):
        await site.stop()
