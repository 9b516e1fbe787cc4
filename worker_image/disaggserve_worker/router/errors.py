"""Errors in OpenAI's wire format.

Clients (the `openai` SDK, LangChain, curl scripts) branch on `error.type` / `error.code` and show
`error.message` to a person, so every refusal the router makes goes out in this one shape, with a
message that names the offending field and what would be accepted instead.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class APIError(Exception):
    """A request the router refuses or cannot finish; carries the HTTP status and OpenAI fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return web.json_response(self.body(), status=self.status, headers={**headers, **self.headers})


def error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 for a request whose content is wrong; the message says how to fix it."""
    return APIError(400, message, param=param, code=code)


class UpstreamError(Exception):
    """No worker could finish the request after the retries allowed; safe for the client to retry."""

    def __init__(self, message: str, *, retryable: bool = True, client_fault: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.client_fault = client_fault

    def api_error(self) -> APIError:
        if self.client_fault:  # a worker judged the request itself wrong (e.g. too long for its cache)
            return APIError(400, f"{self}.", code="rejected_by_worker")
        return APIError(
            503 if self.retryable else 502,
            self.message_for_client(),
            type_="server_error",
            code="upstream_unavailable" if self.retryable else "upstream_error",
            # Workers restart within seconds; clients that honour Retry-After come back then.
            headers={"Retry-After": "2"} if self.retryable else None,
        )

    def message_for_client(self) -> str:
        hint = " The request can be retried." if self.retryable else ""
        return f"{self}.{hint}"
