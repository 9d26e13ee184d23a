"""Thin, compile-friendly loss modules over fastdd's fused ops."""
from fastdd.matchers.infonce import InfoNCEMatcher  # noqa: F401
from fastdd.matchers.mmd import MMDMatcher
from fastdd.matchers.moments import MomentMatcher

__all__ = ["MMDMatcher", "MomentMatcher"]
