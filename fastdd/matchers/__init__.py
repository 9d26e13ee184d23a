"""Thin, compile-friendly loss modules over fastdd's fused ops."""
from fastdd.matchers.bn_stats import BNStatisticsLoss
from fastdd.matchers.infonce import InfoNCEMatcher
from fastdd.matchers.lowrank import LowRankImages
from fastdd.matchers.mmd import MMDMatcher
from fastdd.matchers.moments import MomentMatcher

__all__ = ["BNStatisticsLoss", "InfoNCEMatcher", "LowRankImages", "MMDMatcher", "MomentMatcher"]
