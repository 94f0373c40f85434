"""The one error taxonomy. Pure: no chalice, boto3 or requests here.

Every adapter maps its wire errors to these classes in one place (Metrika: `metrika/cdp.py`; amoCRM:
`crm/amocrm/api.py`; Bitrix24: `crm/bitrix24/api.py`; DynamoDB: `store/dynamodb.py`; SQS:
`queue.py`), and everything above the adapters decides on the class alone:

* `Transient` — the same call may succeed later (429, 5xx, timeouts, a maintenance page instead of
  JSON). Carries `retry_after` (seconds, when the far side said) and `daily_quota` (wait for the
  quota's reset, not a failed attempt). Its kind `OutOfTime`: this invocation had no time left for the
  call, or cut it short (`chalicelib.deadline`) — not a failed attempt either; an admin route answers 504.
  Its kind `Busy`: our own per-token slots were all taken for the whole wait — not a failed attempt.
* `Permanent` — the far side refused this data (Metrika's 400 with `location`s naming the rows).
  Retrying the same data cannot help: the entity is parked with the reason.
* `Misconfigured` — the integration cannot work until a person acts (token revoked, access denied,
  counter not visible). Parked with the reason; nothing about the data is wrong.
* `Unavailable` — our own store or queue cannot be reached. The only error that may fail a worker
  batch or answer an HTTP request with 503.

`ApiError` is what an HTTP route answers with; `http_error` derives it from the taxonomy.
"""
from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    """A failed call to something outside the process. `source` names it ("metrika", "amocrm", …)."""

    kind = "error"

    def __init__(self, message: str, *, source: str = "", status: int | None = None,
                 errors: list[dict] | None = None, retry_after: float | None = None,
                 daily_quota: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.status = status
        self.errors = errors or []  # Metrika's own {error_type, message, location} items
        self.retry_after = retry_after
        self.daily_quota = daily_quota

    @property
    def retryable(self) -> bool:
        return isinstance(self, Transient)

    @property
    def counts_attempt(self) -> bool:
        """Whether retrying after this error counts towards the retry limit: not while waiting for the
        daily quota, nor when our own invocation ran out of time (`OutOfTime`)."""
        return not self.daily_quota

    @property
    def locations(self) -> list[str]:
        """Where the far side says the problem is (`orders[3].createDateTime`)."""
        return [str(e["location"]) for e in self.errors if e.get("location")]

    def describe(self) -> dict:
        """What an operator needs, stored on a parked or retrying entity and shown by the API."""
        described: dict[str, Any] = {"kind": self.kind, "message": self.message, "retryable": self.retryable}
        if self.source:
            described["source"] = self.source
        if self.status is not None:
            described["status"] = self.status
        if self.errors:
            described["errors"] = self.errors
        return described


class Transient(BridgeError):
    kind = "transient"


class OutOfTime(Transient):
    """The invocation's deadline (`chalicelib.deadline`) left no time for a call to `source`, or cut it
    short. The far side may be fine: retried later without counting an attempt."""

    @property
    def counts_attempt(self) -> bool:
        return False


class Busy(Transient):
    """Our own limit on a far side's concurrency was full for the whole wait (the quota governor: every
    one of a Metrika token's slots held by other requests of ours). Nothing about the entity or the far
    side failed, and with many workers contention is routine: retried later without counting an attempt,
    so no deal is parked for waiting its turn (a crashed holder's lease runs out, so the wait ends)."""

    @property
    def counts_attempt(self) -> bool:
        return False


class Permanent(BridgeError):
    kind = "permanent"


class Misconfigured(BridgeError):
    kind = "misconfigured"


class Unavailable(Exception):
    """Our store or queue is unreachable or throttling us: the caller retries the whole request."""

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(f"{what} unavailable{': ' + detail if detail else ''}")
        self.what = what


class ApiError(Exception):
    """An HTTP answer: `{"error", "message", "details"}` with `status`. Raised below a route; the
    app turns it into the response."""

    def __init__(self, status: int, error: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.details = status, error, message, details

    def body(self) -> dict:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist")


def invalid(message: str, details: Any = None) -> ApiError:
    return ApiError(400, "invalid_request", message, details)


def http_error(what: str, exc: BridgeError) -> ApiError:
    """A failed call to the CRM or Metrika under an admin route, as the caller should see it:
    502/503 when it failed or throttled us (try again), 422 when it refused (act on the message), 504
    when the request's time ran out first (`timed_out`)."""
    if isinstance(exc, OutOfTime):
        return timed_out(exc, what)
    prefix = "metrika" if exc.source == "metrika" else "crm"
    if isinstance(exc, Transient):
        return ApiError(503 if exc.status in (420, 429) else 502, f"{prefix}_unavailable",
                        f"{what}: {exc.message}; try again later", exc.describe())
    return ApiError(422, f"{prefix}_refused", f"{what}: {exc.message}", exc.describe())


def timed_out(exc: OutOfTime, what: str = "") -> ApiError:
    """504 `timeout`: the call named in the message did not answer within the time API Gateway leaves a
    request (29 s). What was stored before it stays; the same request may be sent again."""
    message = f"{what}: {exc.message}" if what else exc.message
    return ApiError(504, "timeout", f"{message}; nothing after that call was done: try again",
                    exc.describe())


# Chalice's own answers, given before or around a view (`chalice.app.error_response`,
# `RestAPIEventHandler._get_view_function_response`), named by its error code: ours for each.
_CHALICE_CODES = {
    "UnsupportedMediaType": ("unsupported_media_type", "the Content-Type header is not one this route takes"),
    "MethodNotAllowedError": ("method_not_allowed", "this path does not take this HTTP method"),
    "BadRequest": ("invalid_request", "the request cannot be answered as sent"),
    "InternalServerError": ("internal_error", "an unexpected error occurred"),
}


def reshape_chalice_error(status: int, body: Any, *, request_id: str | None = None) -> dict | None:
    """A body Chalice wrote itself (`{"Code", "Message"}`, exactly those keys) in our shape
    `{"error", "message"}`, keeping Chalice's message after ours; None for any other body (our own
    answers pass unchanged). A 500 carries the request id, as `app.answers` gives one."""
    if not (isinstance(body, dict) and set(body) == {"Code", "Message"}):
        return None
    code, detail = str(body["Code"]), str(body["Message"])[:300]
    error, message = _CHALICE_CODES.get(code, (_snake(code) or "error", "the request was refused"))
    if status >= 500:  # Chalice's text says no more than ours; the id finds the traceback in the log
        request_id = request_id or "unknown"
        return {"error": error, "request_id": request_id, "message": f"{message} (request id {request_id})"}
    reshaped: dict[str, Any] = {"error": error, "message": f"{message} ({detail})" if detail else message}
    if code == "UnsupportedMediaType":
        reshaped["details"] = {"header": "Content-Type"}
    return reshaped


def _snake(code: str) -> str:
    """`SomeChaliceError` → `some_chalice` (a code this module does not list yet)."""
    code = code.removesuffix("Error")
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(code) if c.isalnum())
