"""Attention backends, chosen by name through the registry."""
