"""Settings come from AQUA_PIPELINE_* variables, and a bad one is named in the error."""

import os

import pytest
from pydantic import ValidationError

from pipeline.settings import RESERVED_PATHS, SettingsError, known_variables, load_settings


def test_defaults_load() -> None:
    s = load_settings()
    assert s.s3.part_size >= 5 * 1024 * 1024
    assert s.aqua.base_url.startswith("http")


def test_nested_env_variable_is_read() -> None:
    os.environ["AQUA_PIPELINE_S3__BUCKET"] = "my-bucket"
    os.environ["AQUA_PIPELINE_QUEUE__CONCURRENCY"] = "7"
    s = load_settings()
    assert s.s3.bucket == "my-bucket"
    assert s.queue.concurrency == 7


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AQUA_PIPELINE_S3__PART_SIZE", "1024"),
        ("AQUA_PIPELINE_QUEUE__SEND_LINGER_MS", "-1"),
        ("AQUA_PIPELINE_QUEUE__SEND_LINGER_MS", "soon"),
        ("AQUA_PIPELINE_LEDGER__CALLBACK_LINGER_MS", "101"),
        ("AQUA_PIPELINE_HTTP__IDLE_TIMEOUT_S", "0"),
        ("AQUA_PIPELINE_HTTP__BODY_TIMEOUT_S", "forever"),
        ("AQUA_PIPELINE_AQUA__READ_TIMEOUT_S", "0"),  # aiohttp: 0 turns the timeout off, < 0 fails every call
        ("AQUA_PIPELINE_AQUA__CONNECT_TIMEOUT_S", "-1"),
        ("AQUA_PIPELINE_AWS__READ_TIMEOUT_S", "0"),
        ("AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL", "ftp://hooks.example.com"),  # else every submit fails, not start-up
        ("AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL", "https://hooks.example.com/?x=1"),
        ("AQUA_PIPELINE_HTTP__CALLBACK_PATH", "/callbacks/aqua#x"),
        ("AQUA_PIPELINE_HTTP__CALLBACK_PATH", "callbacks"),  # aiohttp would refuse it at start-up, unnamed
        ("AQUA_PIPELINE_HTTP__CALLBACK_PATH", "/cb/{job}"),
        ("AQUA_PIPELINE_HTTP__CALLBACK_PATH", "/healthz"),  # the service's own routes: taken over or a crash
        ("AQUA_PIPELINE_HTTP__CALLBACK_PATH", "/metrics/"),
        ("AQUA_PIPELINE_HTTP__CALLBACK_PATH", "/admin/jobs"),
        ("AQUA_PIPELINE_SECURITY__SHARED_SECRET", ""),  # an empty secret would let in whoever sends an empty one
        ("AQUA_PIPELINE_SECURITY__ADMIN_TOKEN", ""),
        ("AQUA_PIPELINE_SECURITY__SIGNING_KEYS", '["too-short"]'),
        ("AQUA_PIPELINE_SECURITY__SIGNING_KEYS", "[]"),
    ],
)
def test_bad_variable_is_named(variable: str, value: str) -> None:
    os.environ[variable] = value
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert variable in str(err.value)


def test_bad_url_is_named() -> None:
    os.environ["AQUA_PIPELINE_AQUA__BASE_URL"] = "ftp://nope"
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "AQUA_PIPELINE_AQUA__BASE_URL" in str(err.value)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.s3.bucket = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("AQUA_PIPELINE_SECURITY__ALLOW_CIDRS", '["10.0.0.0/8", "10.0.0.300/32"]', "network: '10.0.0.300/32'"),
        ("AQUA_PIPELINE_SECURITY__TRUSTED_PROXIES", '["proxy.internal"]', "not an IP network: 'proxy.internal'"),
        ("AQUA_PIPELINE_SECURITY__BASIC_USER", "zuora", "basic_user and basic_password must be set together"),
    ],
)
def test_bad_callback_security_stops_start_up(variable: str, value: str, said: str) -> None:
    """Caught at start-up: the callback route would otherwise answer every callback 500."""
    os.environ[variable] = value
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert said in str(err.value)
    if "BASIC" not in variable:
        assert variable in str(err.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AQUA_PIPELINE_SECURITY__ALLOW_CIDRS", "10.0.0.0/8"),
        ("AQUA_PIPELINE_SECURITY__SIGNING_KEYS", "a-plain-key"),
        ("AQUA_PIPELINE_security__trusted_proxies", "10.0.0.1/32,10.0.0.2/32"),
    ],
)
def test_a_list_variable_that_is_not_json_is_named(variable: str, value: str) -> None:
    """pydantic-settings names only the group ("security"); the operator needs the variable and the fix."""
    os.environ[variable] = value
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert variable.upper() in str(err.value)
    assert "takes JSON" in str(err.value)


@pytest.mark.parametrize(
    ("template", "said"),
    [
        ("{prefix}/{job_id}/{batch_name}.{ext}", "must contain {job_id}, {batch_name} and {segment}"),
        ("{prefix}/{job_id}/{segment}.{ext}", "must contain {job_id}, {batch_name} and {segment}"),
        ("{prefix}/{job_name}/{date}/{batch_name}{segment}.{ext}", "must contain {job_id}, {batch_name} and {segment}"),
        ("{prefix}/{jobid}/{batch_name}{segment}.{ext}", "unknown fields ['jobid']"),
        ("{prefix}/{job_id/{batch_name}{segment}", "not a key template"),
    ],
)
def test_a_key_template_that_would_overwrite_or_not_render_stops_start_up(template: str, said: str) -> None:
    """Caught at start-up, not at the first job: a key that leaves out what tells a job's files apart lets one
    file overwrite another unseen."""
    os.environ["AQUA_PIPELINE_S3__KEY_TEMPLATE"] = template
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "AQUA_PIPELINE_S3__KEY_TEMPLATE" in str(err.value) and said in str(err.value)


def test_an_empty_basic_password_stops_start_up() -> None:
    """A secret template that rendered empty must not mean: anyone with an empty password is let in."""
    os.environ["AQUA_PIPELINE_SECURITY__BASIC_USER"] = "zuora"
    os.environ["AQUA_PIPELINE_SECURITY__BASIC_PASSWORD"] = ""
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "AQUA_PIPELINE_SECURITY__BASIC_PASSWORD: must not be empty" in str(err.value)


@pytest.mark.parametrize("base_url", ["https://hooks.example.com", "http://10.0.0.7:8080"])
def test_the_built_in_signing_key_is_refused_for_a_service_others_can_reach(base_url: str) -> None:
    """The development key is in this source: whoever reads it could forge callback tokens."""
    os.environ["AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL"] = base_url
    with pytest.raises(SettingsError) as err:
        load_settings()
    said = str(err.value)
    assert "AQUA_PIPELINE_SECURITY__SIGNING_KEYS: the built-in development key" in said
    assert "AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL" in said
    os.environ["AQUA_PIPELINE_SECURITY__SIGNING_KEYS"] = '["a-long-random-key-of-our-own-1c9e"]'
    assert load_settings().http.public_base_url == base_url


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8080", "http://localhost:9000", "http://[::1]:8080"])
def test_the_built_in_signing_key_serves_on_loopback(base_url: str) -> None:
    """The demo, the simulator and the tests run on loopback with the defaults."""
    os.environ["AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL"] = base_url
    assert load_settings().security.uses_dev_key()


@pytest.mark.parametrize(
    ("template", "said"),
    [
        ("{prefix}/_manifests/{date}.json", "must contain {job_id}"),  # jobs would share (and misread) one manifest
        ("{prefix}/{batch_name}/{job_id}.json", "unknown fields ['batch_name']"),  # a manifest has no batch
    ],
)
def test_a_manifest_template_that_jobs_would_share_or_cannot_render_stops_start_up(template: str, said: str) -> None:
    os.environ["AQUA_PIPELINE_S3__MANIFEST_TEMPLATE"] = template
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "AQUA_PIPELINE_S3__MANIFEST_TEMPLATE" in str(err.value) and said in str(err.value)


def test_the_reserved_paths_are_every_route_of_the_service_but_the_callback() -> None:
    """What the callback-path check refuses is what the app serves besides the callback route."""
    from pipeline.app import create_app

    settings = load_settings()
    routes = {r.resource.canonical for r in create_app(settings).router.routes() if r.resource is not None}
    others = routes - {settings.http.callback_path}
    assert {p for p in others if not p.startswith("/admin/")} == set(RESERVED_PATHS)
    os.environ["AQUA_PIPELINE_HTTP__CALLBACK_PATH"] = "/zuora/hooks/"
    assert load_settings().http.callback_path == "/zuora/hooks/"


@pytest.mark.parametrize(
    ("variable", "said"),
    [
        ("AQUA_PIPELINE_S3_BUCKET", "did you mean AQUA_PIPELINE_S3__BUCKET?"),  # one underscore short
        ("AQUA_PIPELINE_LOGLEVEL", "did you mean AQUA_PIPELINE_LOG_LEVEL?"),
        ("AQUA_PIPELINE_SECURITY_ADMIN_TOKEN", "did you mean AQUA_PIPELINE_SECURITY__ADMIN_TOKEN?"),
        ("AQUA_PIPELINE_COLOUR", "not a setting"),
    ],
)
def test_a_variable_that_is_no_setting_stops_start_up(variable: str, said: str) -> None:
    """A misspelt variable used to be ignored: the setting it meant kept its default (a bucket, no admin token)."""
    os.environ[variable] = "x"
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"{variable}: not a setting" in str(err.value) and said in str(err.value)


def test_every_documented_variable_is_known_and_group_json_too() -> None:
    os.environ["AQUA_PIPELINE_S3"] = '{"bucket": "lake"}'  # a whole group as JSON is a setting too
    os.environ["AQUA_PIPELINE_NO_EXTENSIONS"] = "1"
    os.environ["aqua_pipeline_log_level"] = "DEBUG"  # names are case-insensitive, as pydantic-settings reads them
    s = load_settings()
    assert (s.s3.bucket, s.log_level) == ("lake", "DEBUG")
    assert "AQUA_PIPELINE_HTTP__CALLBACK_PATH" in known_variables()


def test_field_validator_messages_drop_pydantics_prefix() -> None:
    os.environ["AQUA_PIPELINE_SECURITY__BASIC_USER"] = "zuora"
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "Value error" not in str(err.value) and "basic_user and basic_password must be set together" in str(
        err.value
    )
