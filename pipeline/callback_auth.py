"""Request-level checks on an AQuA callback: who may call, and with what proof.

Policy, applied by :meth:`CallbackAuthenticator.authenticate` in this order:

1. **Source address.** The client address is the direct peer, or, only when the direct peer is a trusted
   proxy, the rightmost ``X-Forwarded-For`` entry that is not itself a trusted proxy. When ``allow_cidrs`` is
   set, that address must fall inside one of them (403 ``source_not_allowed``); an unknown address is refused.
2. **Token.** When the query string carries ``token`` (a per-submission ``notifyUrl``), it must verify
   (see :mod:`pipeline.tokens`); a bad token is never rescued by another method. Method ``token``.
3. **Basic.** Otherwise, when ``basic_user``/``basic_password`` are configured (a UI-configured callout), the
   request must carry those credentials; a request without them gets 401 and ``WWW-Authenticate`` so Zuora
   retries with them. Method ``basic``.
4. **Shared secret.** When ``shared_secret`` is configured, the ``X-Aqua-Pipeline-Secret`` header (preferred) or
   the ``secret`` query parameter must carry it: alone (method ``secret``), or after Basic when both are
   configured (method ``basic+secret``: both are required, neither stands in for the other).
5. Otherwise, when ``require_token`` is set: 401 ``token_required``. Else the callback is accepted unproven
   (method ``none``); the worker re-reads the job from AQuA either way, so an unproven callback can at most
   make us look at a job.

Every failure is a :class:`~pipeline.errors.CallbackRejected` carrying the HTTP status, a stable ``code`` and,
for Basic, the challenge header. Secrets are compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import SecretStr

from pipeline.errors import CallbackRejected
from pipeline.settings import SecuritySettings
from pipeline.tokens import TokenClaim, TokenSigner

log = logging.getLogger(__name__)

REALM = "aqua-pipeline"
BASIC_CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
SECRET_HEADER = "X-Aqua-Pipeline-Secret"
SECRET_PARAM = "secret"
TOKEN_PARAM = "token"
MAX_CREDENTIAL_LEN = 4096

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AuthResult:
    """How a callback proved itself, the token's claim when it used one, and the client address we settled on."""

    method: Literal["token", "basic", "secret", "basic+secret", "none"]
    claim: TokenClaim | None
    client_ip: str | None


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def parse_networks(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDRs (a bare address is a /32 or /128); raise ``ValueError`` naming a bad one."""
    for c in cidrs:
        try:
            ipaddress.ip_network(c.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not an IP network: {c!r}") from None
    return _networks(tuple(cidrs))


_CACHED_ADDRESS_LEN = 64
"""Longer than any address with brackets and port: only values this short are cached, so X-Forwarded-For entries
(request text) can hold at most 4,096 x 64 characters of the cache."""


def _parse_ip(value: str | None) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For entry (``[v6]:port`` and ``v4:port`` tolerated). Cached: the
    peers of a receiver behind a load balancer are a few addresses, and parsing one costs more than the token check."""
    if value is not None and len(value) > _CACHED_ADDRESS_LEN:
        return _parse_ip_text(value)
    return _parse_ip_cached(value)


def _parse_ip_text(value: str | None) -> IPAddress | None:
    if not value:
        return None
    text = value.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_parse_ip_cached = functools.lru_cache(maxsize=4096)(_parse_ip_text)


def _within(ip: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in networks)


def client_ip(remote: str | None, forwarded_for: str | None, trusted_proxies: Sequence[str]) -> str | None:
    """The client's address: ``X-Forwarded-For`` is honoured only when the direct peer is a trusted proxy.

    The list is walked from the right, skipping trusted proxies; the first other entry is the client. An entry
    that is not an address ends the walk with None (unknown). When every entry is trusted, the leftmost one is
    the client. IPv4-mapped IPv6 addresses are reported as IPv4.
    """
    peer = _parse_ip(remote)
    if peer is None:
        return None
    trusted = parse_networks(trusted_proxies)
    if not trusted or not forwarded_for or not _within(peer, trusted):
        return str(peer)
    entries = [e.strip() for e in forwarded_for.split(",")]
    ip: IPAddress | None = peer
    for entry in reversed(entries):
        ip = _parse_ip(entry)
        if ip is None:
            return None
        if not _within(ip, trusted):
            return str(ip)
    return str(ip) if ip is not None else None


def check_allowlist(ip: str | None, allow_cidrs: Sequence[str]) -> None:
    """Refuse (403 ``source_not_allowed``) an address outside ``allow_cidrs``; an empty list allows all."""
    if not allow_cidrs:
        return
    addr = _parse_ip(ip)
    if addr is None or not _within(addr, parse_networks(allow_cidrs)):
        raise CallbackRejected("callback source address is not allowed", status=403, code="source_not_allowed")


def _same(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(given, expected)


def check_basic(authorization: str | None, user: str, password: SecretStr) -> None:
    """Check an ``Authorization: Basic`` header; 401 with a ``WWW-Authenticate`` challenge when absent or wrong."""
    if not authorization or not authorization.strip():
        raise CallbackRejected(
            "callback needs HTTP Basic credentials", status=401, code="auth_required", headers=BASIC_CHALLENGE
        )
    invalid = CallbackRejected(
        "callback HTTP Basic credentials are not valid", status=401, code="auth_invalid", headers=BASIC_CHALLENGE
    )
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or len(encoded) > MAX_CREDENTIAL_LEN:
        raise invalid
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise invalid from None
    given_user, sep, given_password = decoded.partition(b":")
    if not sep:
        raise invalid
    user_ok = _same(given_user, user.encode())
    password_ok = _same(given_password, password.get_secret_value().encode())
    if not (user_ok and password_ok):
        raise invalid


def check_shared_secret(value: str | None, secret: SecretStr) -> None:
    """Check a shared secret: 401 ``secret_required`` when absent, 403 ``secret_invalid`` when wrong."""
    if not value:
        raise CallbackRejected("callback needs the shared secret", status=401, code="secret_required")
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates; surrogateescape gives those bytes back.
    given = value.encode("utf-8", "surrogateescape")
    if len(value) > MAX_CREDENTIAL_LEN or not _same(given, secret.get_secret_value().encode()):
        raise CallbackRejected("callback shared secret is not valid", status=403, code="secret_invalid")


def _values(mapping: Mapping[str, str], name: str) -> list[str]:
    """Every value of ``name``: uses ``getall`` on multidicts; a plain dict is searched case-insensitively when
    ``name`` is a header name (the caller passes it as written in the HTTP spec)."""
    getall = getattr(mapping, "getall", None)
    if callable(getall):
        return [str(v) for v in getall(name, [])]
    if name in mapping:
        return [mapping[name]]
    low = name.lower()
    return [v for k, v in mapping.items() if isinstance(k, str) and k.lower() == low]


class CallbackAuthenticator:
    """Applies the module's policy to one request (see the module docstring)."""

    def __init__(self, settings: SecuritySettings, signer: TokenSigner) -> None:
        # SecuritySettings has already checked the networks and the Basic pair (at start-up).
        self._settings = settings
        self._signer = signer

    def authenticate(self, *, query: Mapping[str, str], headers: Mapping[str, str], remote: str | None) -> AuthResult:
        """Authenticate one callback; raise :class:`CallbackRejected` when it must be refused."""
        s = self._settings
        forwarded = ", ".join(_values(headers, "X-Forwarded-For")) or None
        ip = client_ip(remote, forwarded, s.trusted_proxies)
        try:
            return self._authenticate(query, headers, ip)
        except CallbackRejected as exc:
            level = logging.DEBUG if exc.code == "auth_required" else logging.INFO
            log.log(level, "callback rejected: %s (status %d, client %s)", exc.code, exc.status, ip)
            raise

    def _authenticate(self, query: Mapping[str, str], headers: Mapping[str, str], ip: str | None) -> AuthResult:
        s = self._settings
        check_allowlist(ip, s.allow_cidrs)
        tokens = _values(query, TOKEN_PARAM)
        if tokens:
            if len(tokens) != 1:
                raise CallbackRejected("more than one callback token", status=401, code="token_malformed")
            claim = self._signer.verify(tokens[0])
            return AuthResult(method="token", claim=claim, client_ip=ip)
        basic = s.basic_user is not None and s.basic_password is not None
        if s.basic_user is not None and s.basic_password is not None:
            authorization = _values(headers, "Authorization")
            check_basic(authorization[0] if len(authorization) == 1 else None, s.basic_user, s.basic_password)
        if s.shared_secret is not None:  # with Basic configured too, both are required
            given = _values(headers, SECRET_HEADER) or _values(query, SECRET_PARAM)
            check_shared_secret(given[0] if len(given) == 1 else None, s.shared_secret)
            return AuthResult(method="basic+secret" if basic else "secret", claim=None, client_ip=ip)
        if basic:
            return AuthResult(method="basic", claim=None, client_ip=ip)
        if s.require_token:
            raise CallbackRejected("callback carries no token", status=401, code="token_required")
        return AuthResult(method="none", claim=None, client_ip=ip)
