"""Cached, compiled text generation."""

from ._loop import generate as generate

__all__ = ["generate"]
