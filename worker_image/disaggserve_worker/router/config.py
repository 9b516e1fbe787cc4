"""The router's settings, validated once at start-up (flags → this model)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="--model value, as the workers get it (builtin:<name> or a folder)")
    model_name: str = Field(description="the name clients send in the OpenAI `model` field")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    discovery: Literal["static", "kubernetes"] = "static"
    namespace: str | None = None
    selector: str | None = None
    prefill_endpoints: list[str] = Field(default_factory=list)
    decode_endpoints: list[str] = Field(default_factory=list)
    colocated_endpoints: list[str] = Field(default_factory=list)
    mode: Literal["disaggregated", "colocated"] | None = None
    engine: Literal["builtin", "vllm"] = "builtin"
    ttft_slo_ms: float | None = Field(None, gt=0)
    tpot_slo_ms: float | None = Field(None, gt=0)
    api_key_file: Path | None = None
    max_model_len: int | None = Field(None, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    poll_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1)
    queue_timeout_s: float = Field(10.0, ge=0, description="how long a request waits for a worker")
    max_queued: int = Field(1024, ge=0, description="requests waiting for a worker; beyond: 429")
    max_inflight_per_worker: int = Field(
        64, ge=1, description="requests dispatched at once per decode (or colocated) worker; the rest queue")
    token_timeout_s: float = Field(30.0, gt=0, description="longest silence between two tokens")
    prefill_timeout_s: float = Field(120.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0, description="longest wait for a request body to arrive")
    drain_timeout_s: float = Field(60.0, ge=0, description="after SIGTERM, how long to finish requests")
    drain_accept_s: float = Field(
        5.0, ge=0, description="after SIGTERM, how long new requests are still served (with Connection: close) "
        "while the Service stops sending them")

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if self.discovery == "static":
            if not (self.prefill_endpoints or self.decode_endpoints or self.colocated_endpoints):
                raise ValueError("--discovery static needs endpoints: --prefill-endpoints and "
                                 "--decode-endpoints, or --colocated-endpoints (comma-separated http://ip:port)")
            if bool(self.prefill_endpoints) != bool(self.decode_endpoints):
                raise ValueError("disaggregated serving needs both --prefill-endpoints and "
                                 "--decode-endpoints")
            if self.mode == "disaggregated" and not self.prefill_endpoints:
                raise ValueError("--mode disaggregated needs --prefill-endpoints and --decode-endpoints")
            if self.mode == "colocated" and not self.colocated_endpoints:
                raise ValueError("--mode colocated needs --colocated-endpoints")
            for url in self.prefill_endpoints + self.decode_endpoints + self.colocated_endpoints:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"endpoint {url!r} must be an http://host:port URL")
        elif not self.selector:
            raise ValueError("--discovery kubernetes needs --selector (e.g. app.kubernetes.io/instance=NAME)")
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"--api-key-file {self.api_key_file} does not exist or is not a file")
        return self
