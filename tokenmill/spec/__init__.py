"""Speculative decoding: draft proposers, the rejection sampler and the load-aware draft count."""
