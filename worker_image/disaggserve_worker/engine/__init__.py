"""The serving engine: paged KV cache, continuous batching, sampling, detokenisation."""
