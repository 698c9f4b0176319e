"""Errors the `specedge` command reports as one line that says what to do.

    SpecEdgeError              base: a message for the user and an exit code
    ├── ModelFileError         draft model missing, corrupt or unloadable
    ├── ModelDownloadError     a preset could not be fetched or failed its checksum
    ├── NotLoggedIn            no hub (or no token) to talk to: run `specedge login`
    ├── InsecureHub            plain http to a host that is not this machine, without --insecure
    ├── ConversationNotFound   --conversation names no saved conversation
    ├── SettingError           a config key or value `specedge` does not know
    ├── HubNotInstalled        the embedded hub's packages are missing: pip install 'specedge[hub]'
    ├── ApiError               `specedge serve` refuses a request (sent in OpenAI's error shape)
    └── HubError               anything the hub said or did not say
        ├── HubUnreachable     no answer from the hub URL
        ├── HubRejected        the hub answered 4xx (bad input, vocabulary mismatch, ...)
        ├── TokenRejected      401: the token is missing, wrong or revoked: run `specedge login`
        ├── SessionLost        the hub no longer knows our session
        └── HubBusy            the hub is full for now, or a per-user limit (429, with a retry time)

httpx and llama.cpp errors are translated where they enter (`remote/client.py`,
`drafting/engine.py`); the command root prints them and exits. Tracebacks only with
SPECEDGE_DEBUG=1.
"""

from __future__ import annotations


class SpecEdgeError(Exception):
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelFileError(SpecEdgeError):
    pass


class ModelDownloadError(SpecEdgeError):
    pass


class NotLoggedIn(SpecEdgeError):
    pass


class InsecureHub(SpecEdgeError):
    pass


class ConversationNotFound(SpecEdgeError):
    pass


class SettingError(SpecEdgeError):
    pass


class HubNotInstalled(SpecEdgeError):
    pass


class ApiError(SpecEdgeError):
    """A request `specedge serve` refuses: the HTTP status and OpenAI's error `type`, `code` and `param`."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"


class HubError(SpecEdgeError):
    pass


class HubUnreachable(HubError):
    pass


class HubRejected(HubError):
    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


class TokenRejected(HubRejected):
    pass


class SessionLost(HubRejected):
    pass


class HubBusy(HubRejected):
    def __init__(self, message: str, status: int, code: str, retry_after_s: float):
        super().__init__(message, status, code)
        self.retry_after_s = retry_after_s
