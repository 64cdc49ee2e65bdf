"""Attention over the paged KV cache: per-step metadata, the forward context, backends."""
