"""The image's install and entry steps, without a container engine: ``infra/docker-install.sh`` (the script the
Dockerfile's builder stage runs) installs the project into a fresh venv, then ``<venv>/bin/python -m pipeline serve``
(the image's ENTRYPOINT + CMD) runs against the data plane that the CloudFormation template creates in moto."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from pipeline.settings import AwsSettings
from pipeline.testing.cfn import deploy_data_plane, settings_env
from pipeline.testing.moto import MotoServer, free_port

ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = ROOT / "infra" / "docker-install.sh"


def _serve_is_built() -> bool:
    try:
        from pipeline import app
    except ImportError:
        return False
    return hasattr(app, "create_app")


needs_serve = pytest.mark.skipif(not _serve_is_built(), reason="pipeline.app (serve) is not built yet")


def _base_env(tmp: Path) -> dict[str, str]:
    """A clean environment: no developer AWS config, no inherited AQUA_PIPELINE_* variables."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    return {
        **keep,
        "HOME": str(tmp),
        "AWS_CONFIG_FILE": str(tmp / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws-credentials"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv made by the Dockerfile's own install script from this checkout (non-editable, pip cache kept)."""
    tmp = tmp_path_factory.mktemp("image")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["sh", str(INSTALL_SCRIPT), str(tmp / "venv"), str(ROOT)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "venv"


def test_install_script_installs_the_package_not_the_checkout(venv: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import pipeline.csvcheck as c; print(c.__file__, c.DEFAULT_ENGINE)"],
        cwd=tmp_path,
        env=_base_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    path, engine = proc.stdout.split()
    assert Path(path).is_relative_to(venv), path  # a real install, not an editable link to the repo
    assert engine == "c"  # the wheel carries the compiled CSV verifier


def test_entry_point_reads_configuration_from_the_environment(venv: Path, tmp_path: Path) -> None:
    env = {
        **_base_env(tmp_path),
        "AQUA_PIPELINE_HTTP__PORT": "9123",
        "AQUA_PIPELINE_S3__BUCKET": "from-env",
        "AQUA_PIPELINE_EVENTS__TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:aqua-done",
    }
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pipeline", "check-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    effective = orjson.loads(proc.stdout)
    assert effective["http"]["port"] == 9123
    assert effective["s3"]["bucket"] == "from-env"

    bad = subprocess.run(
        [str(venv / "bin" / "aqua-pipeline"), "check-config"],
        cwd=tmp_path,
        env={**env, "AQUA_PIPELINE_HTTP__PORT": "not-a-port"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "AQUA_PIPELINE_HTTP__PORT" in bad.stderr

    no_topic = {k: v for k, v in env.items() if k != "AQUA_PIPELINE_EVENTS__TOPIC_ARN"}
    missing = subprocess.run(
        [str(venv / "bin" / "aqua-pipeline"), "check-config"],
        cwd=tmp_path,
        env=no_topic,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "AQUA_PIPELINE_EVENTS__TOPIC_ARN" in missing.stderr


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def server(
    venv: Path, moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``python -m pipeline serve`` from the venv, pointed at a data plane deployed from the template."""
    if not _serve_is_built():
        pytest.skip("pipeline.app (serve) is not built yet")
    tmp = tmp_path_factory.mktemp("serve")
    aws = AwsSettings(endpoint_url=moto_server.url, access_key_id="testing", secret_access_key="testing")  # type: ignore[arg-type]
    outputs = asyncio.run(deploy_data_plane(aws, f"container-{tmp.name[-12:].replace('_', '-')}"))
    port = free_port()
    env = {
        **_base_env(tmp),
        **settings_env(outputs),
        "AQUA_PIPELINE_AWS__ENDPOINT_URL": moto_server.url,
        "AQUA_PIPELINE_AWS__ACCESS_KEY_ID": "testing",
        "AQUA_PIPELINE_AWS__SECRET_ACCESS_KEY": "testing",
        "AQUA_PIPELINE_HTTP__HOST": "127.0.0.1",
        "AQUA_PIPELINE_HTTP__PORT": str(port),
        "AQUA_PIPELINE_HTTP__SHUTDOWN_GRACE_S": "5",
        "AQUA_PIPELINE_LOG_FORMAT": "text",
    }
    log_path = tmp / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(venv / "bin" / "python"), "-m", "pipeline", "serve"],
            cwd=tmp,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if _get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/healthz did not answer within 30s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc, base, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@needs_serve
def test_serve_answers_healthz(server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    _, base, _ = server
    status, body = _get(base + "/healthz")
    assert status == 200
    assert orjson.loads(body)["status"] == "ok"


@needs_serve
def test_serve_is_ready_against_the_templates_data_plane(server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    _, base, log_path = server
    deadline = time.monotonic() + 15
    status, body = _get(base + "/readyz")
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        status, body = _get(base + "/readyz")
    assert status == 200, body.decode() + "\n" + log_path.read_text()[-2000:]


@needs_serve
def test_sigterm_stops_serve_cleanly(server: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    """The image's STOPSIGNAL: SIGTERM drains and exits 0 (this test runs last in the module)."""
    proc, _, log_path = server
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail("serve did not stop within 30s of SIGTERM")
    assert rc == 0, log_path.read_text()[-3000:]
