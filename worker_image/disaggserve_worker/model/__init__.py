"""Llama-family decoder in plain torch, its configuration, weights and tokenizer."""
