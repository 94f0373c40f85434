"""The current invocation's deadline: how long this Lambda may still run, so that work starts only with
time to finish it and no outbound call outlives it. Pure: standard library only.

A context variable holds the deadline of the invocation in progress; `None` means no deadline (tests,
`chalice local` and the local worker loop, unless they set one). `app.py` sets it per invocation:

* the worker and the schedules from the Lambda context's remaining time (`get_remaining_time_in_millis`,
  "Using the Lambda context object to retrieve Python function information",
  https://docs.aws.amazon.com/lambda/latest/dg/python-context.html);
* the API routes from the moment API Gateway received the request (`requestContext.requestTimeEpoch`,
  "Lambda proxy integrations in API Gateway", section "Input format of a Lambda function for proxy
  integration", https://docs.aws.amazon.com/apigateway/latest/developerguide/set-up-lambda-proxy-integrations.html),
  because API Gateway's 29 s integration timeout counts from there ("Amazon API Gateway quotas",
  https://docs.aws.amazon.com/apigateway/latest/developerguide/limits.html), not from our handler's start.

A deadline has two times: `end`, when the invocation must be done, and `calls_end` = `end` minus a
`reserve` for the store writes and queue sends that record what the last outbound call did. Outbound
calls (the CRM adapters, the Metrika client, the quota governor's wait for a slot) `clip` their timeouts
to `calls_end`; the worker, the history import and the schedules ask `has(seconds)` before starting a
unit of work. A call that cannot start, or that a clipped timeout cut short, raises `OutOfTime`: a
`Transient` that does not count as a failed attempt, because running out of time says nothing about
the entity — the next invocation simply tries again.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from .errors import OutOfTime

# An outbound call given less than this would only fail: it is not started (`OutOfTime` instead).
MIN_CALL_SECONDS = 1.0
# API Gateway's integration timeout for a REST API. Chalice deploys an edge-optimized API, whose limit
# cannot be raised ("Amazon API Gateway quotas": only Regional and private REST APIs may ask for more).
GATEWAY_TIMEOUT = 29.0
# Seconds of that 29 s kept for the answer's way back through API Gateway and for clock skew between
# API Gateway's request time and ours.
GATEWAY_MARGIN = 1.0
# The most we believe of a request's age by API Gateway's clock: the authorizer runs at most 10 s and a
# cold start's init at most 10 s ("Understanding the Lambda execution environment lifecycle",
# https://docs.aws.amazon.com/lambda/latest/dg/lambda-runtime-environment.html); an older time is a clock
# disagreement, and trusting it would answer 504 to every admin call.
MAX_REQUEST_AGE = 20.0
# After an admin route's last outbound call: its store writes (a config, a mapping: a few items) and
# the answer. Single-digit milliseconds each; two seconds also cover the SDK's retries of a throttled write.
API_RESERVE = 2.0

T = TypeVar("T", float, tuple)


@dataclass(frozen=True)
class Deadline:
    end: float  # when the invocation must be done, on `clock`
    calls_end: float  # when outbound calls must be done: `end` minus the reserve for the writes after them
    clock: Callable[[], float]


_CURRENT: ContextVar[Deadline | None] = ContextVar("invocation_deadline", default=None)


def current() -> Deadline | None:
    return _CURRENT.get()


@contextmanager
def invocation(seconds: float | None, *, reserve: float = 0.0,
               clock: Callable[[], float] = time.monotonic) -> Iterator[Deadline | None]:
    """Run the block under a deadline `seconds` from now, of which the last `reserve` seconds are kept
    from outbound calls. `seconds` None: no deadline (a caller with no Lambda context)."""
    if seconds is None:
        token = _CURRENT.set(None)
    else:
        now = clock()
        token = _CURRENT.set(Deadline(end=now + seconds, calls_end=now + seconds - reserve, clock=clock))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


@contextmanager
def narrowed(seconds: float) -> Iterator[None]:
    """Within the block, outbound calls must end `seconds` from now (or earlier, as the invocation's
    deadline says): a phase of a unit of work that must leave time for the phases after it."""
    outer = _CURRENT.get()
    if outer is None:
        yield
        return
    token = _CURRENT.set(Deadline(end=outer.end, calls_end=min(outer.calls_end, outer.clock() + seconds),
                                  clock=outer.clock))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def remaining() -> float | None:
    """Seconds until the invocation must be done (negative once past it); None without a deadline."""
    deadline = _CURRENT.get()
    return None if deadline is None else deadline.end - deadline.clock()


def usable() -> float | None:
    """Seconds outbound calls may still take; None without a deadline."""
    deadline = _CURRENT.get()
    return None if deadline is None else deadline.calls_end - deadline.clock()


def has(seconds: float) -> bool:
    """Whether a unit of work needing `seconds` of outbound calls fits (always, without a deadline)."""
    left = usable()
    return left is None or left >= seconds


def allows(pause: float) -> bool:
    """Whether there is time to wait `pause` seconds and then make one more call (a retry's backoff)."""
    return has(pause + MIN_CALL_SECONDS)


def clip(timeout: T, *, source: str, what: str) -> T:
    """`timeout` (seconds, or requests' `(connect, read)`) cut so that the call ends by `calls_end`.
    A pair whose sum does not fit is split: half the time to connect at most, the rest to read. Raises
    `OutOfTime` when less than MIN_CALL_SECONDS is left. Unchanged without a deadline."""
    left = usable()
    if left is None:
        return timeout
    if left < MIN_CALL_SECONDS:
        raise OutOfTime(f"no time left in this invocation to call {what} ({max(left, 0.0):.1f} s left for calls)",
                        source=source, retry_after=1)
    if isinstance(timeout, tuple):
        connect, read = timeout
        if connect + read <= left:
            return timeout
        connect = min(connect, left / 2)
        return (connect, left - connect)
    return min(timeout, left)


def cut_short(timeout: T, *, source: str, what: str) -> OutOfTime:
    """The error for a call that timed out after `clip` shortened its timeout to `timeout`."""
    seconds = sum(timeout) if isinstance(timeout, tuple) else timeout
    return OutOfTime(f"{what} did not answer within the {seconds:.1f} s left in this invocation",
                     source=source, retry_after=1)


def api_seconds(*, lambda_remaining: float | None, received_at: float | None, now: float) -> float:
    """An API route's budget in seconds: API Gateway's 29 s from when it received the request (epoch
    seconds; None: from now) minus GATEWAY_MARGIN, and never past the Lambda's own remaining time."""
    budget = GATEWAY_TIMEOUT - GATEWAY_MARGIN
    if received_at is not None:
        budget -= min(max(0.0, now - received_at), MAX_REQUEST_AGE)
    if lambda_remaining is not None:
        budget = min(budget, lambda_remaining)
    return budget
