"""The OAuth client-credentials token for AQuA (REFERENCE.md §2.1): fetched once, shared by every caller,
refreshed ``token_refresh_margin_s`` before it expires or when AQuA answers 401."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson

from pipeline.errors import AquaAuthError, AquaRateLimited, AquaUnavailable

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth/token"


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float


def describe_error(exc: BaseException) -> str:
    """``exc`` as it may go into a log line or an error message. aiohttp's ``ClientResponseError`` (a malformed
    response, too many redirects) carries the request in its ``repr``, headers and all: the bearer token with
    them. So it is told by status and message only."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}(status={exc.status}, message={exc.message!r})"
    return repr(exc)


TRANSIENT_4XX = frozenset({408, 425})
"""4xx answers that say "not now" (Request Timeout, Too Early), from AQuA or a proxy in front of it: retried."""

MAX_RETRY_AFTER_S = 3600.0
"""The longest ``Retry-After`` taken as given; a longer one is cut to this."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds only; an HTTP date, ``nan`` or ``inf`` is ignored),
    at most :data:`MAX_RETRY_AFTER_S`."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class TokenCache:
    """One bearer token shared by all requests of an :class:`~pipeline.aqua.client.AquaClient`.

    Concurrent callers that find the token missing or stale share one fetch, and its outcome: when it fails,
    every caller waiting on it gets the same error (each goes back to its own retry loop and backoff) rather
    than posting again to an endpoint that has just refused. After a 429 with ``Retry-After``, callers get
    :class:`AquaRateLimited` at once, with the time left, until that time has passed.
    Errors from the token endpoint are our own types: 429 -> :class:`AquaRateLimited`, 5xx and connection
    errors -> :class:`AquaUnavailable` (both retryable, the client's retry loop handles them), anything else
    -> :class:`AquaAuthError`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        client_id: str,
        client_secret: str,
        refresh_margin_s: float,
        timeout: aiohttp.ClientTimeout,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = base_url + TOKEN_PATH
        self._client_id = client_id
        self._client_secret = client_secret
        self._margin = refresh_margin_s
        self._timeout = timeout
        self._clock = clock
        self._fetching: asyncio.Future[str] | None = None
        self._rate_limited_until = 0.0
        self._token: _Token | None = None
        self.fetches = 0
        """How many times a token was fetched (for metrics and tests)."""

    def _current(self) -> str | None:
        tok = self._token
        if tok is not None and self._clock() < tok.refresh_at:
            return tok.value
        return None

    async def get(self, *, track_id: str | None = None) -> str:
        """A valid token, fetching one if there is none or it is within the refresh margin of expiry."""
        value = self._current()
        if value is not None:
            return value
        if self._fetching is None:
            wait = self._rate_limited_until - self._clock()
            if wait > 0:
                raise AquaRateLimited("token endpoint rate limited (waiting out its Retry-After)", retry_after=wait)
            self._fetching = asyncio.ensure_future(self._fetch(track_id))
            self._fetching.add_done_callback(self._fetched)
        # shielded: a caller that gives up (cancelled) does not cancel the fetch the others wait on
        return await asyncio.shield(self._fetching)

    def _fetched(self, fut: asyncio.Future[str]) -> None:
        self._fetching = None
        if not fut.cancelled():
            fut.exception()  # retrieved here too, so a failure nobody waited for is not reported as lost

    def invalidate(self, stale: str) -> None:
        """Forget ``stale`` after AQuA refused it with 401; the next :meth:`get` fetches a new one.

        A token another caller already refreshed is kept, so racing 401s share one fetch.
        """
        if self._token is not None and self._token.value == stale:
            self._token = None

    async def _fetch(self, track_id: str | None) -> str:
        form = {
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "grant_type": "client_credentials",
        }
        headers = {"Zuora-Track-Id": track_id} if track_id else {}
        started = self._clock()
        try:
            async with self._session.post(self._url, data=form, headers=headers, timeout=self._timeout) as resp:
                request_id = resp.headers.get("Zuora-Request-Id")
                body = await resp.content.read(64 * 1024)
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AquaUnavailable(f"token request failed: {describe_error(exc)}") from exc

        if status == 429:
            if retry_after:
                self._rate_limited_until = self._clock() + retry_after
            raise AquaRateLimited(
                "token endpoint rate limited", retry_after=retry_after, status=status, request_id=request_id
            )
        if status >= 500 or status in TRANSIENT_4XX:
            raise AquaUnavailable(f"token endpoint answered {status}", status=status, request_id=request_id)
        if status != 200:
            raise AquaAuthError(
                f"token request refused with HTTP {status}: {body[:200].decode(errors='replace')}",
                status=status,
                request_id=request_id,
            )
        try:
            data = orjson.loads(body)
            value = str(data["access_token"])
            expires_in = float(data.get("expires_in", 3599))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # A 200 that is no token (a maintenance page, a proxy's answer) says nothing of the credentials.
            raise AquaUnavailable(
                f"token response is not a token: {body[:120].decode(errors='replace')!r}",
                status=status,
                request_id=request_id,
            ) from exc

        # A token shorter-lived than twice the margin is refreshed at half its life, not immediately.
        margin = min(self._margin, expires_in / 2)
        self._token = _Token(value, started + expires_in - margin)
        self.fetches += 1
        log.debug("aqua token fetched (expires_in=%.0fs, request_id=%s)", expires_in, request_id)
        return value
