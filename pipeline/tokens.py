"""Per-submission callback tokens: what proves a callback belongs to a job this service submitted.

Every submission gets a random ``submission_id`` and a token carried in the job's ``notifyUrl``::

    v1.<submission_id>.<expires_at>.<kid>.<mac>

``mac`` is HMAC-SHA256, keyed with the first configured signing key, over the literal text
``v1.<submission_id>.<expires_at>.<kid>`` (base64url, unpadded). ``kid`` is a short fingerprint of the key
(itself an HMAC, so it reveals nothing about the key), which lets verification pick the key: every configured
key verifies, so a key can be rotated by putting the new one first and dropping the old one once the old
tokens have expired. The MAC is compared as text, in constant time, so changing any character is detected.

After AQuA returns the job id, the ledger records ``job_id -> submission_id``; :func:`check_binding` then
refuses a valid token presented with a job id of another submission. Tokens and keys are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from pydantic import SecretStr

from pipeline.aqua.models import MAX_NOTIFY_URL
from pipeline.errors import CallbackRejected

log = logging.getLogger(__name__)

VERSION = "v1"
MAX_TOKEN_LEN = 256
"""Anything longer is refused before any parsing."""

_SID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_EXP_RE = re.compile(r"[1-9][0-9]{0,11}")
_KID_RE = re.compile(r"[0-9a-f]{8}")
_MAC_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def key_id(key: bytes) -> str:
    """The short public fingerprint of a signing key (8 hex characters)."""
    return hmac.new(key, b"aqua-pipeline key id", hashlib.sha256).hexdigest()[:8]


def new_submission_id() -> str:
    """A fresh random submission id: 16 random bytes, base64url (22 characters)."""
    return _b64(secrets.token_bytes(16))


@dataclass(frozen=True)
class IssuedToken:
    """A token just issued; ``expires_at`` is epoch seconds. The token is kept out of ``repr``."""

    token: str = field(repr=False)
    submission_id: str
    expires_at: int


@dataclass(frozen=True)
class TokenClaim:
    """What a verified token says."""

    submission_id: str
    expires_at: int
    kid: str


def _malformed() -> CallbackRejected:
    return CallbackRejected("callback token is malformed", status=401, code="token_malformed")


def _invalid() -> CallbackRejected:
    return CallbackRejected("callback token is not valid", status=403, code="token_invalid")


class TokenSigner:
    """Issues and verifies callback tokens. ``keys[0]`` signs; every key in ``keys`` verifies."""

    def __init__(self, keys: Sequence[SecretStr], ttl_s: int, *, clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("at least one signing key is required")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        raw = [k.get_secret_value().encode() for k in keys]
        if any(not k for k in raw):
            raise ValueError("signing keys must not be empty")
        self._ttl_s = ttl_s
        self._clock = clock
        self._signing_key = raw[0]
        self._signing_kid = key_id(raw[0])
        self._keys: dict[str, list[bytes]] = {}
        for k in raw:
            bucket = self._keys.setdefault(key_id(k), [])
            if k not in bucket:
                bucket.append(k)

    @property
    def kids(self) -> list[str]:
        """Fingerprints of the configured keys, signing key first (safe to log)."""
        return list(self._keys)

    def issue(self, submission_id: str | None = None) -> IssuedToken:
        """Issue a token for ``submission_id`` (a fresh random one when not given), valid for ``ttl_s``."""
        sid = submission_id if submission_id is not None else new_submission_id()
        if not _SID_RE.fullmatch(sid):
            raise ValueError("submission_id must be 16-64 characters of [A-Za-z0-9_-]")
        expires_at = int(self._clock()) + self._ttl_s
        signed = f"{VERSION}.{sid}.{expires_at}.{self._signing_kid}"
        token = f"{signed}.{_mac(self._signing_key, signed)}"
        log.debug("issued callback token for submission %s (kid %s, expires %d)", sid, self._signing_kid, expires_at)
        return IssuedToken(token=token, submission_id=sid, expires_at=expires_at)

    def verify(self, token: str) -> TokenClaim:
        """Check a token's shape, MAC and expiry; raise :class:`CallbackRejected` on any failure.

        Codes: ``token_malformed`` (401), ``token_invalid`` (403: unknown key or bad MAC), ``token_expired`` (401).
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
            raise _malformed()
        parts = token.split(".")
        if len(parts) != 5:
            raise _malformed()
        version, sid, exp, kid, mac = parts
        if (
            version != VERSION
            or not _SID_RE.fullmatch(sid)
            or not _EXP_RE.fullmatch(exp)
            or not _KID_RE.fullmatch(kid)
            or not _MAC_RE.fullmatch(mac)
        ):
            raise _malformed()
        keys = self._keys.get(kid)
        if not keys:
            raise _invalid()
        signed = token[: -len(mac) - 1]
        given = mac.encode("ascii")
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(_mac(key, signed).encode("ascii"), given)
        if not ok:
            raise _invalid()
        expires_at = int(exp)
        if self._clock() >= expires_at:
            raise CallbackRejected("callback token has expired", status=401, code="token_expired")
        return TokenClaim(submission_id=sid, expires_at=expires_at, kid=kid)


def _mac(key: bytes, signed: str) -> str:
    return _b64(hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest())


def check_binding(claim: TokenClaim, recorded_submission_id: str | None) -> None:
    """Refuse (403 ``token_job_mismatch``) unless the callback's job was recorded under the token's submission.

    ``recorded_submission_id`` is what the ledger holds for the callback's job id; None means an unknown job.
    """
    if recorded_submission_id is None:
        raise CallbackRejected("callback token does not match a known job", status=403, code="token_job_mismatch")
    if not hmac.compare_digest(claim.submission_id.encode(), recorded_submission_id.encode()):
        raise CallbackRejected("callback token belongs to another job", status=403, code="token_job_mismatch")


def build_notify_url(public_base_url: str, callback_path: str, token: str) -> str:
    """The ``notifyUrl`` for one submission, with Zuora's ``${JOBID}``/``${STATUS}`` placeholders left literal.

    Raises ``ValueError`` for a base URL that is not plain http(s), a path with a query or fragment, or a result of
    5000 characters or more (AQuA error 90014).
    """
    base = public_base_url.rstrip("/")
    parts = urlsplit(base)
    # "?" and "#" by character: urlsplit gives an empty query for "https://h/?", which would still end the path
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c in base for c in "?#"):
        raise ValueError("public_base_url must be an http(s) URL without query or fragment")
    if any(c.isspace() for c in base):
        raise ValueError("public_base_url must not contain whitespace")
    path = "/" + callback_path.lstrip("/")
    if any(c in path for c in "?#") or any(c.isspace() for c in path):
        raise ValueError("callback_path must be a plain path")
    url = f"{base}{path}?jobId=${{JOBID}}&status=${{STATUS}}&token={quote(token, safe='')}"
    if len(url) > MAX_NOTIFY_URL:
        raise ValueError(f"notifyUrl would be {len(url)} characters; AQuA accepts at most {MAX_NOTIFY_URL}")
    return url
