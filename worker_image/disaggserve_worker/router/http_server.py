"""aiohttp's own refusals (malformed request line, oversized header, bad chunking) in OpenAI's shape.

aiohttp answers what its HTTP parser rejects before any middleware runs, as `text/plain`. Clients of
an OpenAI-compatible server parse `{"error": {...}}` on every 4xx/5xx, so the router's runner swaps
in a request handler whose error page is that JSON body; status codes and connection closing stay
aiohttp's.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .errors import error_body


class _OpenAIErrorHandler(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a reply already started
        if status >= 500:
            text = "The server hit an internal error handling the request; it can be retried."
            kind = "server_error"
        else:
            detail = message or (str(exc) if exc else "") or HTTPStatus(status).phrase
            text = f"The HTTP request could not be parsed: {detail.strip()}. Send a well-formed HTTP/1.1 request."
            kind = "invalid_request_error"
        response = web.Response(status=status, content_type="application/json",
                                text=json.dumps(error_body(text, type_=kind, code=str(status))))
        response.force_close()
        return response


class _OpenAIServer(Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)


class OpenAIAppRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors in OpenAI's error format."""

    async def _make_server(self) -> Server:
        server: Any = await super()._make_server()
        server.__class__ = _OpenAIServer
        return server
