"""The one exception tree. Lower layers translate library errors into these at the edge.

::

    PipelineError                        (base; ``retryable`` says whether trying again may help)
    ├── CallbackRejected                 permanent   a callback we will not act on (status = HTTP code)
    ├── UpstreamError                    AQuA answered badly or not at all
    │   ├── AquaAuthError                permanent   credentials refused (401/403 after one token refresh);
    │   │                                            a job meeting it waits out the retry window all the same
    │   ├── AquaRateLimited              retryable   429 after the bounded retries; carries retry_after
    │   ├── AquaUnavailable              retryable   5xx / connection errors after the bounded retries
    │   ├── AquaValidationError          permanent   AQuA said ``status: error`` with ``errorCode``/``message``
    │   ├── AquaNotFound                 permanent   unknown job, or a file past its retention (404)
    │   └── AquaFileTooLarge             permanent   403 on a file over 2,047 MB
    ├── TransferFailed                   a file did not land; the multipart upload was aborted
    │   ├── IntegrityError               permanent*  bytes/records/CSV shape do not match (*a re-fetch may help)
    │   └── StorageError                 retryable   S3 refused or failed
    ├── PublishFailed                    retryable   the completion event could not be published
    └── LedgerError                      retryable   DynamoDB failed (a lost condition is not an error)
        ├── JobNotInLedger               permanent   no such job in the ledger (not one of this service's)
        └── JobBusy                      retryable   a worker holds the job's lease right now
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error this package raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable

    @property
    def reason(self) -> str:
        """A short machine-friendly reason, used in failure events and metrics."""
        return type(self).__name__


class CallbackRejected(PipelineError):
    """A callback we refuse; ``status`` is the HTTP status to answer with, ``headers`` any to add (e.g. a
    ``WWW-Authenticate`` challenge on 401)."""

    def __init__(
        self, message: str, *, status: int = 400, code: str = "bad_request", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers: dict[str, str] = dict(headers) if headers else {}


class UpstreamError(PipelineError):
    """AQuA failed us."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status
        self.request_id = request_id


class AquaAuthError(UpstreamError):
    """OAuth credentials were refused."""


class AquaRateLimited(UpstreamError):
    """Still rate limited after the bounded retries."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class AquaUnavailable(UpstreamError):
    """5xx or connection failures after the bounded retries."""

    retryable = True


class AquaValidationError(UpstreamError):
    """AQuA rejected the request: HTTP 200 with ``status: error`` and an ``errorCode``."""

    def __init__(self, message: str, *, error_code: str | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.error_code = error_code


class AquaNotFound(UpstreamError):
    """Unknown job id, or a result file purged after its retention (404)."""


class AquaFileTooLarge(UpstreamError):
    """AQuA refuses files over 2,047 MB with 403."""


class TransferFailed(PipelineError):
    """A file could not be stored; no object was left under its final key."""


class IntegrityError(TransferFailed):
    """The bytes did not match what AQuA declared (length, record count, CSV shape)."""


class KeyCollision(TransferFailed):
    """Two of a job's files would be stored under one object key."""


class StorageError(TransferFailed):
    """S3 refused or failed an operation."""

    retryable = True


class PublishFailed(PipelineError):
    """The completion event could not be published."""

    retryable = True


class LedgerError(PipelineError):
    """The job ledger could not be read or written."""

    retryable = True


class JobNotInLedger(LedgerError):
    """The job is not in the ledger: this service never submitted nor heard of it (or its item expired)."""

    retryable = False


class JobBusy(LedgerError):
    """A worker holds the job's lease right now; the action may be tried again once it lets go."""
