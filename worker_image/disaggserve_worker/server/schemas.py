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


class SharedKVRef(_Body):
    """Where a held cache lies in the prefill worker's shared pool (`kv.shared_memory`): a decode
    worker that has that segment mapped copies the runs and checks the lease afterwards, without
    asking the KV port first. Not signed: a wrong one fails the lease check and the pull goes over
    the port as without it."""

    segment: str = Field(min_length=1, max_length=64)
    lease: int = Field(ge=1, lt=1 << 64)
    runs: list[tuple[int, int]] = Field(min_length=1, max_length=1 << 16)


class KVRef(_Body):
    address: str = Field(min_length=3, max_length=300, pattern=r"^.+:\d{1,5}$")
    handle: str = Field(min_length=1, max_length=512)
    bytes: int | None = Field(None, ge=0)
    # HMAC of address and handle under the DisaggServe's token (`disaggserve_worker.auth.sign`).
    signature: str | None = Field(None, max_length=128)
    shm: SharedKVRef | None = None


class DecodeRequest(PromptRequest):
    """POST /internal/decode: the prompt, the first token and where its KV cache waits."""

    first_token_id: int = Field(ge=0)
    kv: KVRef


class ReleaseRequest(_Body):
    """POST /internal/release: a held KV cache the router will not have pulled."""

    handle: str = Field(min_length=1, max_length=512)
