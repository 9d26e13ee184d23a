"""m*, slopes and the pass criteria P1–P6 of spec §6.3–§6.4."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


def threshold(nmse_ref: float) -> float:
    """The m* rule of spec §6.3: NMSE ≤ max(2·NMSE_ref, NMSE_ref + 0.01)."""
    return max(2.0 * nmse_ref, nmse_ref + 0.01)


def m_star(sizes: Sequence[int], nmses: Sequence[float], nmse_ref: float) -> Optional[int]:
    """Smallest size whose NMSE meets :func:`threshold`, or None."""
    thr = threshold(nmse_ref)
    for m, v in sorted(zip(sizes, nmses)):
        if v <= thr:
            return int(m)
    return None


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than two distinct finite points)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a and b and a > 0 and b > 0 and math.isfinite(b)]
    if len({p[0] for p in pts}) < 2:
        return math.nan
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def median(values: Iterable[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else math.nan


def criteria(summary: List[Dict], d_values: Sequence[int], r_values: Sequence[int]) -> List[Dict]:
    """P1–P6 from per-(variant, d, r) medians over seeds.

    ``summary`` rows: variant, d, r, m_star, M_star, energy, min_cos, nmse, nmse_fresh, nmse_random,
    found (fraction of seeds with an m*), d_rel (variant D). Returns rows: name, value, verdict, note."""
    def rows(v):
        return [s for s in summary if s["variant"] == v]

    out = []
    # P1: slope of log m* vs log d per r, median over r, for A, B, C
    p1 = {}
    for v in ("A", "B", "C"):
        slopes = []
        for r in r_values:
            pts = sorted((s["d"], s["m_star"]) for s in rows(v) if s["r"] == r and math.isfinite(s["m_star"]))
            if len(pts) >= 2:
                slopes.append(loglog_slope(*zip(*pts)))
        p1[v] = median(slopes)
    ok1 = all(math.isfinite(x) and x <= 0.3 for x in p1.values() if not math.isnan(x)) and any(
        math.isfinite(x) for x in p1.values())
    out.append(dict(name="P1", value="; ".join(f"{v}: {x:.2f}" for v, x in p1.items()),
                    verdict="PASS" if ok1 else "FAIL", note="slope of log m* vs log d ≤ 0.3 (median over r)"))
    # P2: slope of log(M*/d) vs log r per d, median over d; criterion on C
    p2 = {}
    for v in ("A", "B", "C"):
        slopes = []
        for d in d_values:
            pts = sorted((s["r"], s["M_star"] / d) for s in rows(v) if s["d"] == d and math.isfinite(s["M_star"]))
            if len(pts) >= 2:
                slopes.append(loglog_slope(*zip(*pts)))
        p2[v] = median(slopes)
    ok2 = math.isfinite(p2["C"]) and p2["C"] <= 2.3
    out.append(dict(name="P2", value="; ".join(f"{v}: {x:.2f}" for v, x in p2.items()),
                    verdict="PASS" if ok2 else "FAIL", note="slope of log(M*/d) vs log r ≤ 2.3 for C"))
    # P3: energy and cosines at m* for A and C
    vals = [(s["energy"], s["min_cos"]) for v in ("A", "C") for s in rows(v) if math.isfinite(s["m_star"])]
    emin = min((e for e, _ in vals), default=math.nan)
    cmin = min((c for _, c in vals), default=math.nan)
    ok3 = bool(vals) and emin >= 0.9 and cmin >= 0.9
    out.append(dict(name="P3", value=f"min E_U {emin:.3f}, min cos {cmin:.3f}", verdict="PASS" if ok3 else "FAIL",
                    note="at m*: E_U ≥ 0.9 and every principal cosine ≥ 0.9 (A, C; medians over seeds)"))
    # P4: every cell has an m*, and the random subset at m* has NMSE ≥ 0.5
    cells = [s for v in ("A", "B", "C") for s in rows(v)]
    found = min((s["found"] for s in cells), default=0.0)
    rmin = min((s["nmse_random"] for s in cells if math.isfinite(s["nmse_random"])), default=math.nan)
    ok4 = bool(cells) and found >= 1.0 and rmin >= 0.5
    out.append(dict(name="P4", value=f"cells with m* {sum(s['found'] >= 1 for s in cells)}/{len(cells)}, "
                    f"min random-subset NMSE {rmin:.3f}", verdict="PASS" if ok4 else "FAIL",
                    note="m* rule met in every cell; same-size random real subset NMSE ≥ 0.5"))
    # P5: fresh W0' NMSE ≤ 2x matched at m*, A and C
    ratios = [s["nmse_fresh"] / s["nmse"] for v in ("A", "C") for s in rows(v)
              if math.isfinite(s["m_star"]) and s["nmse"] > 0]
    rmax = max(ratios, default=math.nan)
    ok5 = bool(ratios) and rmax <= 2.0
    out.append(dict(name="P5", value=f"max fresh/matched {rmax:.2f}", verdict="PASS" if ok5 else "FAIL",
                    note="fresh W0' NMSE ≤ 2x matched-W0 NMSE at m* (A, C)"))
    # P6: variant D
    dd = [s["d_rel"] for s in rows("D")]
    dmax = max(dd, default=math.nan)
    ok6 = bool(dd) and dmax <= 1e-6
    out.append(dict(name="P6", value=f"max relative NMSE difference {dmax:.1e}", verdict="PASS" if ok6 else "FAIL",
                    note="variant D (L stored floats) reproduces NMSE_ref within 1e-6"))
    return out
