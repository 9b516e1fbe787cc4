"""vLLM's endpoints beside the OpenAI ones, so tools written for vLLM find them on the router.

`GET /health` and `/ping` (benchmark clients such as guidellm probe them before sending load),
`GET /version`, `POST /tokenize` and `/detokenize` (clients count tokens with the server's own
tokenizer), and `GET /v1/models/{id}` (the `openai` SDK's `models.retrieve`). Bodies and answers
follow vLLM's OpenAI server; errors are OpenAI-format like every other router reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from aiohttp import web
from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from .. import __version__
from .errors import APIError, invalid
from .schemas import ChatMessage, _Lenient, parse_body

if TYPE_CHECKING:
    from .app import Router


class TokenizeRequest(_Lenient):
    """vLLM's two forms: a completion `prompt`, or chat `messages` rendered with the chat template."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise invalid("send exactly one of prompt (text) or messages (chat).", "prompt")
        return self


class DetokenizeRequest(_Lenient):
    model: StrictStr | None = None
    tokens: Annotated[list[StrictInt], Field(min_length=0)]


def register_vllm_endpoints(app: web.Application, router: Router) -> None:
    handlers = VllmEndpoints(router)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ping", handlers.health)
    app.router.add_post("/ping", handlers.health)
    app.router.add_get("/version", handlers.version)
    app.router.add_post("/tokenize", handlers.tokenize)
    app.router.add_post("/detokenize", handlers.detokenize)
    app.router.add_get("/v1/models/{model_id:.+}", handlers.model)


class VllmEndpoints:
    def __init__(self, router: Router) -> None:
        self.router = router

    async def health(self, request: web.Request) -> web.Response:
        """Liveness, as vLLM's: 200 with an empty body while the server runs (readiness is /readyz)."""
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self.router.model.name:
            raise APIError(404, f"The model {model_id!r} does not exist; this server serves "
                           f"{self.router.model.name!r}.", param="model", code="model_not_found")
        return web.json_response(self.router.model_card())

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.router.model.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                           f"{self.router.model.name!r}.", param="model", code="model_not_found")

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = parse_body(TokenizeRequest, await self.router.json_body(request))
        self._check_model(req.model)
        info = self.router.model
        if req.messages is not None:
            messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
            text = info.chat_template.render(messages, add_generation_prompt=req.add_generation_prompt,
                                             **(req.chat_template_kwargs or {}))
        else:
            text = req.prompt or ""
        ids = info.tokenizer.encode(text, add_special_tokens=req.add_special_tokens).ids
        body: dict[str, Any] = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [info.tokenizer.id_to_token(i) for i in ids]
        return web.json_response(body)

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = parse_body(DetokenizeRequest, await self.router.json_body(request))
        self._check_model(req.model)
        vocab = self.router.model.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise invalid(f"tokens must be ids in [0, {vocab}); got {bad[:5]}.", "tokens")
        return web.json_response({"prompt": self.router.model.decode(req.tokens)})
