"""Speculative decoding for the decode loop: proposers, verification, goodput-chosen length."""
