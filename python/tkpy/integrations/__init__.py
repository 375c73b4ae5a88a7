"""Adapters that plug tkpy into other libraries (diffusers)."""
