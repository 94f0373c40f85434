"""Errors the API answers with: one JSON shape, `{"error", "message", "details"}`, for every 4xx/5xx."""
from __future__ import annotations

from typing import Any

from chalice.app import ChaliceUnhandledError, Response


class ApiError(ChaliceUnhandledError):
    """Raised anywhere below a route; the app's middleware turns it into the response.

    Subclasses ChaliceUnhandledError because Chalice lets only that family reach middleware.
    """

    def __init__(self, status: int, error: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.details = status, error, message, details

    def to_response(self) -> Response:
        body = {"error": self.error, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return Response(body=body, status_code=self.status)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist")


def invalid(message: str, details: Any = None) -> ApiError:
    return ApiError(400, "invalid_request", message, details)
