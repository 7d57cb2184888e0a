"""The orchestrator's errors: one tree, one handler (``api/errors.py``).

::

    OrchestratorError                     500 internal_error
    ├── InvalidRequest (ValueError)        400 invalid_request (or a more specific code)
    │   └── RequestTooLarge                413 request_too_large
    ├── Unauthorized                       401 invalid_api_key
    ├── SessionNotFound (LookupError)      404 session_not_found: unknown, expired or another tenant's
    ├── FileNotFound (LookupError)         404 file_not_found: no such path in the session's directory
    ├── CapacityExhausted                  429 rate_limit_exceeded, with Retry-After; nothing ran
    │   └── Saturated                      504 the same on SandboxFusion's routes (the one status verl retries)
    └── SandboxFailure                     5xx, only ever before user code reached a kernel
        ├── BackendUnavailable             503 the engine cannot be reached
        ├── SandboxImageMissing            500 misconfiguration: retrying cannot help
        ├── SandboxStartFailed             503 the container was removed again
        └── RunnerFailure                  502 the runner broke before the code was handed over

Every class says whether the SDKs may retry (``retry``), which sets ``x-should-retry``: only a 429
says yes; every 5xx says no (1.x retries 5xx regardless; 2.x obeys). Once code
has been handed to a kernel, failures are not errors at all: they are a 200 whose outputs say
what happened, because both SDK generations retry 5xx and would run the code again.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the API renders; catch this to catch them all."""

    status_code: int = 500
    code: str = "internal_error"
    type: str = "server_error"
    retry: bool = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(OrchestratorError, ValueError):
    """The request is malformed or asks for something unsupported; nothing ran."""

    status_code = 400
    code = "invalid_request"
    type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    """The body is over the configured size limit; it was not read to the end."""

    status_code = 413
    code = "request_too_large"


class Unauthorized(OrchestratorError):
    """No API key, or one that is not configured."""

    status_code = 401
    code = "invalid_api_key"
    type = "authentication_error"


class SessionNotFound(OrchestratorError, LookupError):
    """Unknown, expired, or another tenant's session: deliberately indistinguishable."""

    status_code = 404
    code = "session_not_found"
    type = "invalid_request_error"


class FileNotFound(OrchestratorError, LookupError):
    """No such file or directory in the session's working directory (the file routes)."""

    status_code = 404
    code = "file_not_found"
    type = "invalid_request_error"


class CapacityExhausted(OrchestratorError):
    """A session cap is reached; safe to retry later because nothing ran."""

    status_code = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"
    retry = True

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CallerGone(OrchestratorError):
    """The client closed its connection before its code started, so it was not run (nobody reads this)."""

    status_code = 499
    code = "client_closed_request"
    type = "invalid_request_error"


class Saturated(CapacityExhausted):
    """Every sandbox a SandboxFusion route may use is busy; nothing ran. Its clients retry only 504."""

    status_code = 504
    code = "saturated"


class SandboxFailure(OrchestratorError):
    """A sandbox could not be provided; raised only before user code reached a kernel."""

    status_code = 503
    code = "sandbox_unavailable"


class BackendUnavailable(SandboxFailure):
    """The container engine cannot be reached."""

    code = "backend_unavailable"


class SandboxImageMissing(SandboxFailure):
    """The sandbox image is not present; an operator must build it (``make image``)."""

    status_code = 500
    code = "sandbox_image_missing"


class SandboxStartFailed(SandboxFailure):
    """A container did not become ready; it has been removed again."""

    code = "sandbox_start_failed"


class SandboxTaken(SandboxStartFailed):
    """Another control plane claimed this warm sandbox first: it serves their session, leave it be."""

    code = "sandbox_taken"


class RunnerFailure(SandboxFailure):
    """The runner inside a sandbox broke or went silent."""

    status_code = 502
    code = "runner_failure"
