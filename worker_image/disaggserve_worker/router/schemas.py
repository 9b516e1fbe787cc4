"""OpenAI request bodies (with vLLM's extensions), validated at the edge.

The router accepts what vLLM's OpenAI server accepts: fields it does not know are ignored (logged at
debug level, as vLLM does), so clients that send newer OpenAI fields or other servers' extensions
keep working (guidellm, `vllm bench serve`, the `openai` SDK). Fields it knows are typed strictly (a
string where a number belongs is refused, not coerced). What this server truly cannot do — beam
search, structured outputs, tool calling, prompt logprobs, images — is refused with a 400 in OpenAI's
format that names the field and says so: silently ignoring those would be a wrong answer the client
cannot see.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import APIError, invalid

log = logging.getLogger(__name__)

StrictFloat = Annotated[float, Field(strict=True)]
MAX_STOP_SEQUENCES = 4
MAX_N = 128
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_ONLY = "this model takes text only"

# vLLM fields that change the answer in a way this server cannot: refused by name when set.
_REFUSED: dict[str, str] = {
    "use_beam_search": "beam search is not supported by this server; sample with n instead",
    "guided_json": "structured outputs (guided_json) are not supported by this server",
    "guided_regex": "structured outputs (guided_regex) are not supported by this server",
    "guided_choice": "structured outputs (guided_choice) are not supported by this server",
    "guided_grammar": "structured outputs (guided_grammar) are not supported by this server",
    "structured_outputs": "structured outputs are not supported by this server",
    "bad_words": "bad_words is not supported by this server",
    "prompt_logprobs": "prompt logprobs are not returned by this server",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported; the stop string is always cut",
    "prompt_embeds": f"prompt_embeds are not accepted: {TEXT_ONLY} (send prompt as text or token ids)",
    "audio": f"audio output is not supported: {TEXT_ONLY}",
    "chat_template": "a per-request chat_template is not accepted; the model's own template is used",
    "continue_final_message": "continue_final_message is not supported by this server",
    "functions": "function calling is not supported by this server; omit functions",
    "function_call": "function calling is not supported by this server; omit function_call",
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Lenient):
    include_usage: StrictBool = False
    # vLLM: every chunk carries the usage so far (guidellm always sends it).
    continuous_usage_stats: StrictBool = False


class _SamplingFields(_Lenient):
    """Fields shared by both endpoints; ranges are OpenAI's and vLLM's."""

    model: StrictStr
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]] | None = None
    user: StrictStr | None = None
    # Newer OpenAI fields: accepted, typed, without effect on generation.
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    # vLLM's sampling extensions.
    ignore_eos: StrictBool = False
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=2.0)] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    allowed_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] | None = None
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    return_token_ids: StrictBool | None = None
    priority: StrictInt = 0
    # vLLM's P/D proxies pass this through; the built-in engine moves KV caches itself.
    kv_transfer_params: dict[str, Any] | None = None
    best_of: StrictInt | None = None
    # Known to vLLM, refused here when set (see _REFUSED).
    use_beam_search: StrictBool = False
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    bad_words: list[StrictStr] | None = None
    prompt_logprobs: Any = None
    include_stop_str_in_output: StrictBool = False
    prompt_embeds: Any = None

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        for name, why in _REFUSED.items():
            value = getattr(self, name, None)
            if value not in (None, False, [], {}):
                raise invalid(f"{name}: {why}.", name, "unsupported_parameter")
        if self.best_of not in (None, 1) and self.best_of != (self.n or 1):
            raise invalid(f"best_of={self.best_of} is not supported; send best_of equal to n (or omit it).",
                          "best_of", "unsupported_parameter")
        if self.priority != 0:
            raise invalid("priority scheduling is not enabled on this server; omit priority or send 0.",
                          "priority", "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true.", "stream_options")
        for key in self.logit_bias or {}:
            if not key.lstrip("-").isdigit():
                raise invalid(f"logit_bias keys are token ids as strings; got {key!r}.", "logit_bias")
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

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def choices(self) -> int:
        return self.n or 1

    def logprobs_count(self) -> int | None:
        """How many top logprobs per token (None: no logprobs at all)."""
        raise NotImplementedError

    def sampling_extras(self, vocab_size: int) -> dict[str, Any]:
        """The worker `sampling` keys beyond max_tokens/temperature/top_p/seed/stop/ignore_eos."""
        extras: dict[str, Any] = {}
        if self.top_k not in (None, 0, -1):
            extras["top_k"] = self.top_k
        if self.min_p:
            extras["min_p"] = self.min_p
        if self.min_tokens:
            extras["min_tokens"] = self.min_tokens
        if self.repetition_penalty not in (None, 1.0):
            extras["repetition_penalty"] = self.repetition_penalty
        if self.presence_penalty:
            extras["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            extras["frequency_penalty"] = self.frequency_penalty
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids)):
            if ids:
                bad = [i for i in ids if i >= vocab_size]
                if bad:
                    raise invalid(f"{name} must be token ids in [0, {vocab_size}); got {bad[:5]}.", name)
                extras[name] = list(ids)
        if self.logit_bias:
            bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            bad = [i for i in bias if not 0 <= i < vocab_size]
            if bad:
                raise invalid(f"logit_bias keys must be token ids in [0, {vocab_size}); got {bad[:5]}.", "logit_bias")
            extras["logit_bias"] = bias
        count = self.logprobs_count()
        if count is not None:
            extras["logprobs"] = count
        return extras


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16
    echo: StrictBool | None = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: StrictStr | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise invalid("suffix (insertion) is not supported by this model; omit it.", "suffix",
                          "unsupported_parameter")
        if self.echo and self.logprobs is not None:
            raise invalid("echo together with logprobs needs prompt logprobs, which this server does not "
                          "return; drop echo or logprobs.", "logprobs", "unsupported_parameter")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise invalid("prompt must not be an empty list.", "prompt")
        return self

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_inputs(self) -> list[str | list[int]]:
        """Every prompt of the request, as text or token ids (a batch gives one choice set each)."""
        prompt = self.prompt
        prompts: list[Any] = prompt if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) \
            else [prompt]
        for p in prompts:
            if isinstance(p, list) and not p:
                raise invalid("prompt must not be empty.", "prompt")
        return prompts


class ContentPart(_Lenient):
    type: StrictStr
    text: StrictStr | None = None
    refusal: StrictStr | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type in ("text", "input_text") and self.text is not None:
            return self
        if self.type == "refusal" and self.refusal is not None:
            return self
        if self.type in ("text", "input_text", "refusal"):
            raise invalid(f"a content part of type {self.type!r} needs its {self.type.split('_')[-1]!r} field.",
                          "messages")
        raise invalid(f"content part type {self.type!r} cannot be served: {TEXT_ONLY}. Send the message "
                      "content as text.", "messages", "unsupported_content")

    @property
    def value(self) -> str:
        return self.text if self.text is not None else (self.refusal or "")


class ChatMessage(BaseModel):
    """One message; extra keys (tool_call_id, tool_calls, reasoning) are kept, as chat histories carry them."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts_first(cls, value: Any) -> Any:
        # Check part types before the union does, so an image gets "text only", not a type error.
        if isinstance(value, list):
            return [ContentPart.model_validate(p) if isinstance(p, dict) else p for p in value]
        return value

    @model_validator(mode="after")
    def _check_role(self) -> ChatMessage:
        if self.role not in CHAT_ROLES:
            raise invalid(f"unknown role {self.role!r}; expected one of {', '.join(CHAT_ROLES)}.", "messages")
        if self.content is None and self.role != "assistant":
            raise invalid(f"a {self.role!r} message needs content.", "messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.value for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True
    echo: StrictBool = False
    audio: Any = None
    chat_template: StrictStr | None = None
    continue_final_message: StrictBool = False
    functions: Any = None
    function_call: Any = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if not self.messages:
            raise invalid("messages must contain at least one message.", "messages")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs needs logprobs set to true.", "top_logprobs")
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            raise invalid("tool calling is not supported by this server; omit tools/tool_choice.", "tools",
                          "unsupported_parameter")
        if self.response_format not in (None, {"type": "text"}):
            kind = self.response_format.get("type") if self.response_format else None
            raise invalid(f"response_format {kind!r} (structured output) is not supported by this server; only "
                          "{\"type\": \"text\"} is.", "response_format", "unsupported_parameter")
        if self.modalities and set(self.modalities) - {"text"}:
            raise invalid(f"modalities {self.modalities}: {TEXT_ONLY}.", "modalities", "unsupported_parameter")
        if self.echo:
            raise invalid("echo is not supported for chat completions by this server; omit it.", "echo",
                          "unsupported_parameter")
        return self

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body into `model`, turning pydantic's report into one OpenAI error."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}.")
    try:
        parsed = model.model_validate(body)
    except APIError:
        raise
    except ValidationError as exc:
        raise _from_validation(exc) from None
    ignored = sorted(set(body) - set(model.model_fields))
    if ignored:
        log.debug("ignoring request fields this server does not use: %s", ", ".join(ignored))
    return parsed


parse_body = parse_request


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
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return invalid(f"invalid value for {param!r}: {err['msg']} (got {shown}).", param, "invalid_value")


def _most_useful(errors: list[Any]) -> Any:
    """Union types report one error per branch; the shortest location is the one a person wrote."""
    return min(errors, key=lambda e: (e["type"] != "missing", len(e["loc"])))


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart", "parse_request"]
