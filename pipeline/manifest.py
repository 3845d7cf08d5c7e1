"""S3 key naming and the job manifest: written last and create-only, it is the commit marker downstream
readers wait for.

Keys are rendered from templates (``S3Settings.key_template`` / ``manifest_template``) with every field
sanitised to ``[A-Za-z0-9._=-]``, so nothing that came from AQuA or a caller can add a ``/`` or a ``..``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from datetime import date, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from pipeline.errors import StorageError
from pipeline.models import Manifest, dumpb
from pipeline.settings import S3Settings

log = logging.getLogger(__name__)

__all__ = ["ManifestStore", "manifest_key", "object_key", "sanitize"]

STATELESS = "_stateless"
MAX_FIELD = 120
MAX_KEY = 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")
_DOTS = re.compile(r"\.{2,}")


def sanitize(value: str) -> str:
    """One safe path segment: unsafe characters → ``_``, no ``..``, never empty, ``.`` or too long."""
    out = _DOTS.sub(lambda m: "_" * len(m.group()), _UNSAFE.sub("_", value))
    if out in ("", "."):
        out = "_"
    if len(out) > MAX_FIELD:  # keep it unique: truncated names get a hash of the whole value
        out = f"{out[: MAX_FIELD - 9]}_{hashlib.sha256(value.encode()).hexdigest()[:8]}"
    return out


def _field(name: str, value: Any) -> str:
    if name == "prefix":  # operator config: may have several segments, each sanitised
        return "/".join(sanitize(p) for p in str(value or "").split("/") if p)
    if name == "segment":
        return "" if value is None or value == "" else f"-{int(value):05d}"
    if value is None:
        return STATELESS if name in ("partner", "project") else "-"
    if isinstance(value, datetime):
        value = value.date()
    if isinstance(value, date):
        return value.isoformat()
    return sanitize(str(value))


def object_key(template: str, **fields: Any) -> str:
    """Render ``template`` with sanitised ``fields``; unknown or missing fields raise ``ValueError``.

    ``partner``/``project`` None → ``_stateless``; ``segment`` int → ``-00001``, None → ``""``; a date or
    datetime → ``YYYY-MM-DD``; other None → ``-``. Leading/trailing and doubled slashes are removed.
    """
    wanted = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = wanted - fields.keys()
    if missing:
        raise ValueError(f"key template needs {sorted(missing)}")
    rendered = template.format(**{k: _field(k, v) for k, v in fields.items() if k in wanted})
    key = "/".join(part for part in rendered.split("/") if part)
    if not key or len(key.encode()) > MAX_KEY:
        raise ValueError(f"rendered key is empty or longer than {MAX_KEY} bytes")
    return key


def manifest_key(template: str, **fields: Any) -> str:
    """Render the manifest key (``S3Settings.manifest_template``); same rules as :func:`object_key`."""
    return object_key(template, **fields)


class ManifestStore:
    """Commits and loads manifests in one bucket, over an injected aiobotocore S3 client."""

    def __init__(
        self,
        s3_client: Any,
        bucket: str,
        template: str,
        *,
        prefix: str = "",
        sse: str = "none",
        kms_key_id: str | None = None,
    ) -> None:
        self._s3 = s3_client
        self.bucket = bucket
        self._template = template
        self._prefix = prefix
        self._sse: dict[str, str] = {}
        if sse != "none":
            self._sse["ServerSideEncryption"] = sse
            if sse == "aws:kms" and kms_key_id:
                self._sse["SSEKMSKeyId"] = kms_key_id

    @classmethod
    def from_settings(cls, s3_client: Any, s3: S3Settings) -> ManifestStore:
        """The store for the configured bucket, template, prefix and encryption."""
        return cls(s3_client, s3.bucket, s3.manifest_template, prefix=s3.prefix, sse=s3.sse, kms_key_id=s3.kms_key_id)

    def key_for(self, manifest: Manifest) -> str:
        """Where ``manifest`` is (or will be) stored."""
        return manifest_key(
            self._template,
            prefix=self._prefix,
            job_id=manifest.job_id,
            job_name=manifest.job_name,
            partner=manifest.partner,
            project=manifest.project,
            # the job's start date, as in object keys: the same on every attempt (not the attempt's own date)
            date=manifest.start_time[:10] if manifest.start_time and len(manifest.start_time) >= 10 else "undated",
        )

    async def commit(self, manifest: Manifest) -> tuple[str, bool]:
        """Write the manifest if none exists yet (``If-None-Match: *``); ``(key, False)`` if one already did.

        An existing manifest is never overwritten: the first commit wins.
        """
        key = self.key_for(manifest)
        try:
            await self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=dumpb(manifest),
                ContentType="application/json",
                ChecksumAlgorithm="CRC32",
                IfNoneMatch="*",
                **self._sse,
            )
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if err.get("Code") == "PreconditionFailed" or status == 412:
                log.info("manifest %s already committed; kept the existing one", key)
                return key, False
            raise StorageError(f"cannot write manifest s3://{self.bucket}/{key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot write manifest s3://{self.bucket}/{key}: {exc}") from exc
        log.info("manifest committed at s3://%s/%s (%d objects)", self.bucket, key, len(manifest.objects))
        return key, True

    async def load(self, key: str) -> Manifest:
        """Read a committed manifest back; a missing or unreadable one raises a permanent ``StorageError``."""
        try:
            obj = await self._s3.get_object(Bucket=self.bucket, Key=key)
            async with obj["Body"] as body:
                data = await body.read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            missing = code in ("NoSuchKey", "404", "NotFound")
            raise StorageError(f"cannot read manifest s3://{self.bucket}/{key}: {exc}", retryable=not missing) from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read manifest s3://{self.bucket}/{key}: {exc}") from exc
        try:
            return Manifest.model_validate_json(data)
        except ValidationError as exc:
            raise StorageError(f"manifest s3://{self.bucket}/{key} is not valid: {exc}", retryable=False) from exc
