"""OpenAI request bodies, validated at the edge.

Types are strict (a string where a number belongs is refused, not coerced) and unknown fields are
refused as OpenAI does ("Unrecognized request argument"), because a silently ignored parameter is a
wrong answer the client cannot see. Parameters OpenAI defines but this server cannot honour (n > 1,
logprobs, tools, penalties) are accepted only at their neutral value and refused otherwise with a
message saying so.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from .errors import APIError, invalid

StrictFloat = Annotated[float, Field(strict=True)]
MAX_STOP_SEQUENCES = 4
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints; ranges are OpenAI's."""

    model: StrictStr
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    # vLLM's extension, for benchmarks that need fixed output lengths.
    ignore_eos: StrictBool = False
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    user: StrictStr | None = None

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        if self.n not in (None, 1):
            raise invalid(
                f"n={self.n} is not supported: this server returns one choice per request; "
                "send n=1 (or omit it) and issue parallel requests instead.",
                "n",
            )
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true.", "stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise invalid(f"{name} is not supported by this server; omit it or send 0.", name)
        if self.logit_bias:
            raise invalid("logit_bias is not supported by this server; omit it.", "logit_bias")
        return self

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(f"stop accepts at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}.", "stop")
        if any(s == "" for s in stops):
            raise invalid("stop sequences must be non-empty strings.", "stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    echo: StrictBool | None = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.logprobs is not None:
            raise invalid("logprobs are not returned by this server; omit logprobs.", "logprobs")
        if self.best_of not in (None, 1):
            raise invalid(f"best_of={self.best_of} is not supported; send best_of=1 or omit it.", "best_of")
        if self.suffix:
            raise invalid("suffix (insertion) is not supported by this model; omit it.", "suffix")
        if isinstance(self.prompt, list):
            if len(self.prompt) == 0:
                raise invalid("prompt must not be an empty list.", "prompt")
            if isinstance(self.prompt[0], (str, list)) and len(self.prompt) > 1:
                raise invalid(
                    "batched prompts (a list of several prompts) are not supported; send one prompt per "
                    "request.",
                    "prompt",
                )
        return self

    def prompt_input(self) -> str | list[int]:
        """The single prompt as text or token ids, after batch forms of one element are unwrapped."""
        prompt = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise invalid("prompt must not be empty.", "prompt")
        return prompt  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """One message; extra keys (tool_call_id, refusal) are tolerated, as chat histories carry them."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _check_role(self) -> ChatMessage:
        if self.role not in CHAT_ROLES:
            raise invalid(f"unknown role {self.role!r}; expected one of {', '.join(CHAT_ROLES)}.", "messages")
        if self.content is None and self.role != "assistant":
            raise invalid(f"a {self.role!r} message needs content.", "messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if not self.messages:
            raise invalid("messages must contain at least one message.", "messages")
        if self.logprobs or self.top_logprobs:
            raise invalid("logprobs are not returned by this server; omit logprobs/top_logprobs.", "logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise invalid("tool calling is not supported by this server; omit tools/tool_choice.", "tools")
        if self.response_format not in (None, {"type": "text"}):
            raise invalid("only response_format {\"type\": \"text\"} is supported.", "response_format")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(model: type[_SamplingFields], body: Any) -> Any:
    """Validate a JSON body into `model`, turning pydantic's report into one OpenAI error."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}.")
    try:
        return model.model_validate(body)
    except APIError:
        raise
    except ValidationError as exc:
        raise _from_validation(exc) from None


def _from_validation(exc: ValidationError) -> APIError:
    # Our own `invalid(...)` raised inside a validator arrives wrapped as a ValueError.
    for err in exc.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, APIError):
            return ctx_error
    err = _most_useful(exc.errors())
    loc = [str(part) for part in err["loc"]]
    param = ".".join(loc) if loc else None
    kind = err["type"]
    if kind == "missing":
        return invalid(f"missing required parameter: {param!r}.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return invalid(f"Unrecognized request argument supplied: {param}.", param, "unknown_parameter")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return invalid(f"invalid value for {param!r}: {err['msg']} (got {shown}).", param, "invalid_value")


def _most_useful(errors: list[Any]) -> Any:
    """Union types report one error per branch; the shortest location is the one a person wrote."""
    return min(errors, key=lambda e: (e["type"] != "missing", len(e["loc"])))
