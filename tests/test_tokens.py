"""Per-submission callback tokens: issue/verify, rotation, expiry, tampering, binding, notifyUrl building."""

from __future__ import annotations

import logging
import string

import pytest
from pydantic import SecretStr

from pipeline.errors import CallbackRejected
from pipeline.tokens import (
    IssuedToken,
    TokenClaim,
    TokenSigner,
    build_notify_url,
    check_binding,
    key_id,
    new_submission_id,
)

OLD = SecretStr("old-signing-key-0123456789")
NEW = SecretStr("new-signing-key-9876543210")
NOW = 1_700_000_000.0
TTL = 3600


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signer(clock: Clock) -> TokenSigner:
    return TokenSigner([NEW, OLD], TTL, clock=clock)


def test_issue_and_verify_round_trip(signer: TokenSigner) -> None:
    issued = signer.issue()
    assert issued.expires_at == int(NOW) + TTL
    version, sid, exp, kid, mac = issued.token.split(".")
    assert (version, sid, exp, kid) == (
        "v1",
        issued.submission_id,
        str(issued.expires_at),
        key_id(b"new-signing-key-9876543210"),
    )
    assert len(mac) == 43
    claim = signer.verify(issued.token)
    assert claim == TokenClaim(submission_id=issued.submission_id, expires_at=issued.expires_at, kid=kid)


def test_token_is_url_safe_and_compact(signer: TokenSigner) -> None:
    token = signer.issue().token
    assert set(token) <= set(string.ascii_letters + string.digits + "-_.")
    assert len(token) < 120


def test_submission_ids_are_random_and_url_safe() -> None:
    ids = {new_submission_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 22 and set(i) <= set(string.ascii_letters + string.digits + "-_") for i in ids)


def test_issue_with_given_submission_id(signer: TokenSigner) -> None:
    issued = signer.issue("sub_0123456789abcdef")
    assert signer.verify(issued.token).submission_id == "sub_0123456789abcdef"


@pytest.mark.parametrize("sid", ["", "short", "has.dot.inside.xxxxxx", "x" * 65, "spaces are bad here!"])
def test_issue_refuses_bad_submission_id(signer: TokenSigner, sid: str) -> None:
    with pytest.raises(ValueError):
        signer.issue(sid)


def test_token_not_in_repr(signer: TokenSigner) -> None:
    issued = signer.issue()
    assert issued.token not in repr(issued)
    assert isinstance(issued, IssuedToken)


def test_expiry_with_injected_clock(signer: TokenSigner, clock: Clock) -> None:
    token = signer.issue().token
    clock.now = NOW + TTL - 1
    signer.verify(token)
    clock.now = NOW + TTL
    with pytest.raises(CallbackRejected) as exc:
        signer.verify(token)
    assert (exc.value.status, exc.value.code) == (401, "token_expired")


def test_rotation_old_key_verifies_while_configured(clock: Clock) -> None:
    old_signer = TokenSigner([OLD], TTL, clock=clock)
    token = old_signer.issue().token
    rotated = TokenSigner([NEW, OLD], TTL, clock=clock)
    assert rotated.verify(token).kid == key_id(b"old-signing-key-0123456789")
    # new tokens are signed with the first key
    assert rotated.issue().token.split(".")[3] == key_id(b"new-signing-key-9876543210")
    removed = TokenSigner([NEW], TTL, clock=clock)
    with pytest.raises(CallbackRejected) as exc:
        removed.verify(token)
    assert (exc.value.status, exc.value.code) == (403, "token_invalid")


def test_wrong_key_with_forged_kid_is_invalid(clock: Clock) -> None:
    attacker = TokenSigner([SecretStr("attacker-key")], TTL, clock=clock)
    forged = attacker.issue().token.split(".")
    forged[3] = key_id(b"new-signing-key-9876543210")
    with pytest.raises(CallbackRejected) as exc:
        TokenSigner([NEW], TTL, clock=clock).verify(".".join(forged))
    assert exc.value.code == "token_invalid"


def test_tampering_any_character_is_rejected(signer: TokenSigner) -> None:
    token = signer.issue().token
    alphabet = string.ascii_letters + string.digits + "-_."
    for i, ch in enumerate(token):
        for repl in {alphabet[(alphabet.index(ch) + 1) % len(alphabet)], "A" if ch != "A" else "B", "."} - {ch}:
            tampered = token[:i] + repl + token[i + 1 :]
            with pytest.raises(CallbackRejected) as exc:
                signer.verify(tampered)
            assert exc.value.code in ("token_invalid", "token_malformed"), (i, repl)
            assert exc.value.status in (401, 403)


def test_extending_expiry_breaks_the_mac(signer: TokenSigner, clock: Clock) -> None:
    version, sid, exp, kid, mac = signer.issue().token.split(".")
    later = f"{version}.{sid}.{int(exp) + 10**6}.{kid}.{mac}"
    with pytest.raises(CallbackRejected) as exc:
        signer.verify(later)
    assert exc.value.code == "token_invalid"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1.a.b.c.d",
        "v2.AAAAAAAAAAAAAAAAAAAAAA.1700003600.abcdef01." + "A" * 43,
        "v1.AAAAAAAAAAAAAAAAAAAAAA.01700003600.abcdef01." + "A" * 43,
        "v1.AAAAAAAAAAAAAAAAAAAAAA.1700003600.ABCDEF01." + "A" * 43,
        "v1.AAAAAAAAAAAAAAAAAAAAAA.1700003600.abcdef01." + "A" * 42,
        "v1.AAAAAAAAAAAAAAAAAAAAAA.1700003600.abcdef01." + "A" * 43 + ".x",
        "x" * 10_000,
        "v1.AAAAAAAAAAAAAAAAAAAAAA.1700003600.abcdef01." + "A" * 42 + "=",
    ],
)
def test_malformed_tokens(signer: TokenSigner, token: str) -> None:
    with pytest.raises(CallbackRejected) as exc:
        signer.verify(token)
    assert (exc.value.status, exc.value.code) == (401, "token_malformed")


def test_unknown_kid_is_invalid(signer: TokenSigner) -> None:
    with pytest.raises(CallbackRejected) as exc:
        signer.verify("v1.AAAAAAAAAAAAAAAAAAAAAA.1700003600.abcdef01." + "A" * 43)
    assert (exc.value.status, exc.value.code) == (403, "token_invalid")


def test_signer_refuses_no_or_empty_keys() -> None:
    with pytest.raises(ValueError):
        TokenSigner([], TTL)
    with pytest.raises(ValueError):
        TokenSigner([SecretStr("")], TTL)
    with pytest.raises(ValueError):
        TokenSigner([NEW], 0)


def test_never_logs_token_or_key(signer: TokenSigner, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pipeline")
    token = signer.issue().token
    signer.verify(token)
    with pytest.raises(CallbackRejected):
        signer.verify(token[:-1] + ("A" if token[-1] != "A" else "B"))
    text = caplog.text
    assert token.split(".")[-1] not in text
    assert "signing-key" not in text


def test_check_binding() -> None:
    claim = TokenClaim(submission_id="sub_0123456789abcdef", expires_at=1, kid="abcdef01")
    check_binding(claim, "sub_0123456789abcdef")
    for recorded in (None, "sub_other_submission"):
        with pytest.raises(CallbackRejected) as exc:
            check_binding(claim, recorded)
        assert (exc.value.status, exc.value.code) == (403, "token_job_mismatch")


def test_build_notify_url_keeps_placeholders_literal() -> None:
    url = build_notify_url("https://hooks.example.com/", "callbacks/aqua", "v1.abc.1.def.ghi")
    assert url == "https://hooks.example.com/callbacks/aqua?jobId=${JOBID}&status=${STATUS}&token=v1.abc.1.def.ghi"


def test_build_notify_url_with_base_path_and_encoding() -> None:
    url = build_notify_url("https://h.example.com/prefix", "/cb", "a b&c")
    assert url == "https://h.example.com/prefix/cb?jobId=${JOBID}&status=${STATUS}&token=a%20b%26c"


def test_build_notify_url_round_trips_a_real_token(signer: TokenSigner) -> None:
    from urllib.parse import parse_qs, urlsplit

    token = signer.issue().token
    url = build_notify_url("https://hooks.example.com", "/callbacks/aqua", token)
    called = url.replace("${JOBID}", "2c9a00aa11bb22cc33dd44ee55ff6601").replace("${STATUS}", "Completed")
    query = parse_qs(urlsplit(called).query)
    assert query == {"jobId": ["2c9a00aa11bb22cc33dd44ee55ff6601"], "status": ["Completed"], "token": [token]}
    assert signer.verify(query["token"][0])


@pytest.mark.parametrize(
    ("base", "path"),
    [
        ("ftp://h.example.com", "/cb"),
        ("https://", "/cb"),
        ("https://h.example.com?x=1", "/cb"),
        ("https://h.example.com/?", "/cb"),  # an empty query or fragment still ends the path
        ("https://h.example.com/#", "/cb"),
        ("https://h.example.com/a#b", "/cb"),
        ("https://h.example.com/a b", "/cb"),
        ("https://h.example.com", "/cb?x=1"),
        ("https://h.example.com", "/cb#frag"),
        ("https://h.example.com", "/c b"),
    ],
)
def test_build_notify_url_refuses_bad_parts(base: str, path: str) -> None:
    with pytest.raises(ValueError):
        build_notify_url(base, path, "t")


def test_build_notify_url_length_limit() -> None:
    base = "https://h.example.com"
    fixed = len(build_notify_url(base, "/cb", ""))
    assert len(build_notify_url(base, "/cb", "x" * (4999 - fixed))) == 4999
    with pytest.raises(ValueError, match=r"5000 characters"):
        build_notify_url(base, "/cb", "x" * (5000 - fixed))
