"""Run the service as a real subprocess (``python -m pipeline serve``), configured only through its
environment, exactly as the container runs it. Used by the shutdown and reliability tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from pipeline.settings import ENV_PREFIX, Settings


def _env_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        import orjson

        return orjson.dumps([_env_value(v) for v in value]).decode()
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``AQUA_PIPELINE_*`` variables that reproduce ``settings`` in another process."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            for sub in type(value).model_fields:
                v = _env_value(getattr(value, sub))
                if v is not None:
                    env[f"{ENV_PREFIX}{name.upper()}__{sub.upper()}"] = v
        else:
            v = _env_value(value)
            if v is not None:
                env[f"{ENV_PREFIX}{name.upper()}"] = v
    return env


@dataclass
class ServiceProcess:
    """One ``aqua-pipeline serve`` subprocess."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http.port}"

    def start(
        self,
        *,
        timeout_s: float = 30.0,
        extra_env: dict[str, str] | None = None,
        cwd: Path | None = None,
        known_env: Collection[str] | None = None,
    ) -> ServiceProcess:
        """Start (in ``cwd``, default this process's) and wait until ``/healthz`` answers. ``known_env``: pass only
        these settings variables (for a service from another source tree, whose settings may predate some)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update({k: v for k, v in settings_env(self.settings).items() if known_env is None or k in known_env})
        env.update(extra_env or {})
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).close()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"service did not become healthy; log: {self.log_path}")

    def terminate(self, *, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL (a crash): no cleanup code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
