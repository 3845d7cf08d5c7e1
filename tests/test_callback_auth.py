"""Request-level callback checks: client address, allowlist, Basic, shared secret, and the combined policy."""

from __future__ import annotations

import base64
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from multidict import CIMultiDict, MultiDict
from pydantic import SecretStr

from pipeline.callback_auth import (
    AuthResult,
    CallbackAuthenticator,
    check_allowlist,
    check_basic,
    check_shared_secret,
    client_ip,
)
from pipeline.errors import CallbackRejected
from pipeline.settings import SecuritySettings
from pipeline.tokens import TokenSigner

KEY = SecretStr("test-signing-key")
NOW = 1_700_000_000.0
CHALLENGE = {"WWW-Authenticate": 'Basic realm="aqua-pipeline"'}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make(**kw: Any) -> tuple[CallbackAuthenticator, TokenSigner]:
    settings = SecuritySettings(signing_keys=[KEY], **kw)
    signer = TokenSigner(settings.signing_keys, settings.token_ttl_s, clock=lambda: NOW)
    return CallbackAuthenticator(settings, signer), signer


# --- client_ip ---------------------------------------------------------------------------------------------


def test_client_ip_direct_peer_without_proxies() -> None:
    assert client_ip("203.0.113.9", "198.51.100.1", []) == "203.0.113.9"
    assert client_ip(None, "198.51.100.1", ["10.0.0.0/8"]) is None
    assert client_ip("not-an-ip", None, []) is None


def test_xff_from_untrusted_peer_is_ignored() -> None:
    assert client_ip("203.0.113.9", "198.51.100.1", ["10.0.0.0/8"]) == "203.0.113.9"


def test_trusted_proxy_is_honoured() -> None:
    assert client_ip("10.0.0.5", "198.51.100.1", ["10.0.0.0/8"]) == "198.51.100.1"


def test_xff_walked_from_the_right_skipping_trusted_proxies() -> None:
    # the client spoofed "1.1.1.1"; the real client is 198.51.100.1, then two internal hops
    xff = "1.1.1.1, 198.51.100.1, 10.1.2.3"
    assert client_ip("10.0.0.5", xff, ["10.0.0.0/8"]) == "198.51.100.1"


def test_xff_all_trusted_gives_leftmost() -> None:
    assert client_ip("10.0.0.5", "10.9.9.9, 10.1.1.1", ["10.0.0.0/8"]) == "10.9.9.9"


def test_xff_garbage_entry_gives_unknown() -> None:
    assert client_ip("10.0.0.5", "198.51.100.1, garbage, 10.1.1.1", ["10.0.0.0/8"]) is None


def test_xff_with_ports_and_brackets() -> None:
    assert client_ip("10.0.0.5", "198.51.100.1:4711", ["10.0.0.0/8"]) == "198.51.100.1"
    assert client_ip("10.0.0.5", "[2001:db8::1]:4711", ["10.0.0.0/8"]) == "2001:db8::1"


def test_ipv6_peer_and_proxies() -> None:
    assert client_ip("2001:db8::5", "2001:db8:ffff::7", ["2001:db8::/64"]) == "2001:db8:ffff::7"
    assert client_ip("2001:db8:1::5", "2001:db8:ffff::7", ["2001:db8::/64"]) == "2001:db8:1::5"
    assert client_ip("2001:DB8::0005", None, []) == "2001:db8::5"


def test_ipv4_mapped_ipv6_is_reported_as_ipv4() -> None:
    assert client_ip("::ffff:10.0.0.5", "198.51.100.1", ["10.0.0.0/8"]) == "198.51.100.1"
    assert client_ip("::ffff:203.0.113.9", None, []) == "203.0.113.9"


# --- allowlist ---------------------------------------------------------------------------------------------


def test_allowlist_empty_allows_everything() -> None:
    check_allowlist("203.0.113.9", [])
    check_allowlist(None, [])


@pytest.mark.parametrize("ip", ["192.0.2.10", "2001:db8::1", "::ffff:192.0.2.10"])
def test_allowlist_accepts_inside(ip: str) -> None:
    check_allowlist(ip, ["192.0.2.0/24", "2001:db8::/32"])


@pytest.mark.parametrize("ip", ["192.0.3.1", "2001:db9::1", None, "", "garbage"])
def test_allowlist_refuses_outside_or_unknown(ip: str | None) -> None:
    with pytest.raises(CallbackRejected) as exc:
        check_allowlist(ip, ["192.0.2.0/24", "2001:db8::/32"])
    assert (exc.value.status, exc.value.code) == (403, "source_not_allowed")


# --- basic -------------------------------------------------------------------------------------------------


def test_basic_missing_gets_challenge() -> None:
    for header in (None, "", "   "):
        with pytest.raises(CallbackRejected) as exc:
            check_basic(header, "zuora", SecretStr("pw"))
        assert (exc.value.status, exc.value.code, exc.value.headers) == (401, "auth_required", CHALLENGE)


def test_basic_valid() -> None:
    check_basic(basic("zuora", "p:w ü"), "zuora", SecretStr("p:w ü"))
    check_basic("basic " + base64.b64encode(b"zuora:pw").decode(), "zuora", SecretStr("pw"))


@pytest.mark.parametrize(
    "header",
    [
        basic("zuora", "wrong"),
        basic("other", "pw"),
        basic("zuora", ""),
        "Bearer abc",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic " + "A" * 5000,
        "Basic",
    ],
)
def test_basic_invalid_gets_challenge(header: str) -> None:
    with pytest.raises(CallbackRejected) as exc:
        check_basic(header, "zuora", SecretStr("pw"))
    assert (exc.value.status, exc.value.code, exc.value.headers) == (401, "auth_invalid", CHALLENGE)


# --- shared secret -----------------------------------------------------------------------------------------


def test_shared_secret() -> None:
    check_shared_secret("s3cret", SecretStr("s3cret"))
    with pytest.raises(CallbackRejected) as exc:
        check_shared_secret(None, SecretStr("s3cret"))
    assert (exc.value.status, exc.value.code) == (401, "secret_required")
    # "wr\udcffong": how aiohttp hands over a header holding the byte 0xff (not UTF-8), which .encode() refuses
    for wrong in ("s3cre", "s3cret!", "S3CRET", "ü", "wr\udcffong"):
        with pytest.raises(CallbackRejected) as exc:
            check_shared_secret(wrong, SecretStr("s3cret"))
        assert (exc.value.status, exc.value.code) == (403, "secret_invalid")


# --- the policy --------------------------------------------------------------------------------------------


def test_policy_token_accepted() -> None:
    auth, signer = make()
    issued = signer.issue()
    result = auth.authenticate(query={"token": issued.token, "jobId": "x"}, headers={}, remote="203.0.113.9")
    assert result.method == "token"
    assert result.claim is not None and result.claim.submission_id == issued.submission_id
    assert result.client_ip == "203.0.113.9"


def test_policy_bad_token_is_not_rescued_by_basic() -> None:
    auth, signer = make(basic_user="zuora", basic_password=SecretStr("pw"))
    token = signer.issue().token
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(
            query={"token": token[:-2] + "xx"}, headers={"Authorization": basic("zuora", "pw")}, remote="192.0.2.1"
        )
    assert exc.value.code == "token_invalid"


def test_policy_two_tokens_refused() -> None:
    auth, signer = make()
    token = signer.issue().token
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query=MultiDict([("token", token), ("token", token)]), headers={}, remote="192.0.2.1")
    assert exc.value.code == "token_malformed"


def test_policy_basic_when_configured() -> None:
    auth, _ = make(basic_user="zuora", basic_password=SecretStr("pw"))
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={}, headers={}, remote="192.0.2.1")
    assert (exc.value.status, exc.value.code, exc.value.headers) == (401, "auth_required", CHALLENGE)
    headers = CIMultiDict({"authorization": basic("zuora", "pw")})
    assert auth.authenticate(query={}, headers=headers, remote="192.0.2.1") == AuthResult("basic", None, "192.0.2.1")
    # a plain dict with other casing also works
    assert auth.authenticate(query={}, headers={"AUTHORIZATION": basic("zuora", "pw")}, remote=None).method == "basic"


def test_policy_shared_secret_header_or_query() -> None:
    auth, _ = make(shared_secret=SecretStr("s3cret"))
    assert auth.authenticate(query={}, headers={"X-Aqua-Pipeline-Secret": "s3cret"}, remote=None).method == "secret"
    assert auth.authenticate(query={"secret": "s3cret"}, headers={}, remote=None).method == "secret"
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={"secret": "nope"}, headers={}, remote=None)
    assert exc.value.code == "secret_invalid"
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={}, headers={}, remote=None)
    assert exc.value.code == "secret_required"


def test_policy_basic_and_shared_secret_together_require_both() -> None:
    """Both configured: a callout must carry both; neither stands in for the other."""
    auth, _ = make(basic_user="zuora", basic_password=SecretStr("pw"), shared_secret=SecretStr("s3cret"))
    creds = {"Authorization": basic("zuora", "pw")}
    both = auth.authenticate(query={}, headers={**creds, "X-Aqua-Pipeline-Secret": "s3cret"}, remote=None)
    assert both.method == "basic+secret"
    assert auth.authenticate(query={"secret": "s3cret"}, headers=creds, remote=None).method == "basic+secret"
    for query, headers, code in [
        ({}, creds, "secret_required"),
        ({"secret": "nope"}, creds, "secret_invalid"),
        ({"secret": "s3cret"}, {}, "auth_required"),  # the challenge first, so Zuora sends its credentials
        ({"secret": "s3cret"}, {"Authorization": basic("zuora", "no")}, "auth_invalid"),
    ]:
        with pytest.raises(CallbackRejected) as exc:
            auth.authenticate(query=query, headers=headers, remote=None)
        assert exc.value.code == code, (query, headers)


def test_policy_token_required() -> None:
    auth, _ = make()
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={"jobId": "x"}, headers={}, remote="192.0.2.1")
    assert (exc.value.status, exc.value.code) == (401, "token_required")


def test_policy_none_when_nothing_required() -> None:
    auth, _ = make(require_token=False)
    assert auth.authenticate(query={}, headers={}, remote="192.0.2.1") == AuthResult("none", None, "192.0.2.1")


def test_policy_allowlist_comes_first() -> None:
    auth, signer = make(allow_cidrs=["192.0.2.0/24"], trusted_proxies=["10.0.0.0/8"])
    token = signer.issue().token
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={"token": token}, headers={}, remote="203.0.113.9")
    assert exc.value.code == "source_not_allowed"
    # spoofed XFF from an untrusted peer does not help
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={"token": token}, headers={"X-Forwarded-For": "192.0.2.7"}, remote="203.0.113.9")
    assert exc.value.code == "source_not_allowed"
    # through the trusted proxy, the forwarded address counts (multiple XFF headers are joined in order)
    headers = CIMultiDict([("X-Forwarded-For", "203.0.113.1"), ("X-Forwarded-For", "192.0.2.7")])
    result = auth.authenticate(query={"token": token}, headers=headers, remote="10.0.0.5")
    assert (result.method, result.client_ip) == ("token", "192.0.2.7")
    with pytest.raises(CallbackRejected) as exc:
        auth.authenticate(query={"token": token}, headers={"X-Forwarded-For": "203.0.113.1"}, remote="10.0.0.5")
    assert exc.value.code == "source_not_allowed"


def test_policy_rejects_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        make(basic_user="zuora")
    with pytest.raises(ValueError):
        make(allow_cidrs=["not-a-cidr"])
    with pytest.raises(ValueError):
        make(trusted_proxies=["10.0.0.0/33"])


def test_rejections_logged_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pipeline")
    auth, signer = make()
    token = signer.issue().token
    # Always a different character (replacing the last one by "A" was a no-op 1 time in 64).
    forged = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(CallbackRejected):
        auth.authenticate(query={"token": forged}, headers={}, remote="192.0.2.1")
    assert "token_invalid" in caplog.text and "192.0.2.1" in caplog.text
    assert token[:-2] not in caplog.text and "test-signing-key" not in caplog.text


# --- property: anything goes in, only CallbackRejected or a proven token comes out ---------------------------

_AUTH, _SIGNER = make(trusted_proxies=["10.0.0.0/8"])
_VALID = _SIGNER.issue().token

header_names = st.sampled_from(["Authorization", "X-Forwarded-For", "X-Aqua-Pipeline-Secret", "x-forwarded-for"])
query_names = st.sampled_from(["token", "secret", "jobId", "status"])
tampered = st.builds(
    lambda i, c: _VALID[: i % len(_VALID)] + c + _VALID[i % len(_VALID) + 1 :],
    st.integers(min_value=0),
    st.characters(),
)


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    query=st.dictionaries(query_names | st.text(max_size=8), st.text() | tampered, max_size=4),
    headers=st.dictionaries(header_names | st.text(max_size=8), st.text(), max_size=4),
    remote=st.none() | st.text(max_size=40) | st.ip_addresses().map(str),
)
def test_property_never_succeeds_without_a_valid_token(
    query: dict[str, str], headers: dict[str, str], remote: str | None
) -> None:
    try:
        result = _AUTH.authenticate(query=query, headers=headers, remote=remote)
    except CallbackRejected as exc:
        assert exc.status in (401, 403)
        return
    assert result.method == "token"
    assert query["token"] == _VALID


def test_long_forwarded_entries_are_parsed_but_not_cached() -> None:
    from pipeline.callback_auth import _parse_ip, _parse_ip_cached

    padded = " " * 100 + "10.1.2.3"
    before = _parse_ip_cached.cache_info().currsize
    assert str(_parse_ip(padded)) == "10.1.2.3" and _parse_ip("x" * 500) is None
    assert _parse_ip_cached.cache_info().currsize == before  # request text longer than an address is never kept
    assert str(_parse_ip("10.9.8.7:443")) == "10.9.8.7" and _parse_ip_cached.cache_info().currsize == before + 1
