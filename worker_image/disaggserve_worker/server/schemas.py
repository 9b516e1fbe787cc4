"""Bodies of the internal worker protocol (see `disaggserve_worker.contract`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from disaggserve_worker.engine.sampling import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptRequest(_Body):
    """POST /internal/prefill and /internal/generate."""

    request_id: str = Field(min_length=1, max_length=256)
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)


class KVRef(_Body):
    address: str = Field(min_length=3, max_length=300, pattern=r"^.+:\d{1,5}$")
    handle: str = Field(min_length=1, max_length=512)
    bytes: int | None = Field(None, ge=0)
    # HMAC of address and handle under the DisaggServe's token (`disaggserve_worker.auth.sign`).
    signature: str | None = Field(None, max_length=128)


class DecodeRequest(PromptRequest):
    """POST /internal/decode: the prompt, the first token and where its KV cache waits."""

    first_token_id: int = Field(ge=0)
    kv: KVRef


class ReleaseRequest(_Body):
    """POST /internal/release: a held KV cache the router will not have pulled."""

    handle: str = Field(min_length=1, max_length=512)
