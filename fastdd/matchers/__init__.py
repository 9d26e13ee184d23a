"""Thin, compile-friendly loss modules over fastdd's fused ops."""
from fastdd.matchers.mmd import MMDMatcher

__all__ = ["MMDMatcher"]
