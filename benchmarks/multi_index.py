"""Theory check: distilling multi-index tasks (spec ``theory_kinoshita.md`` §6; ``fastdd.theory``).

    python benchmarks/multi_index.py            # full grid of spec §6.2
    python benchmarks/multi_index.py --quick    # CI-sized subset (a minute or two)

For each (d, r, seed) cell and variant A–D it distils sets of increasing size m (B and C stop, unless
``--all-sizes``, at the first m that meets the m* rule of spec §6.3; A optimises all its sizes in one
batched run, exactly equivalent to separate runs, so it reports every size), and writes
``benchmarks/results/multi_index.{csv,md}`` (+ PNG plots when matplotlib is installed). It prints the
pass criteria P1–P6 of spec §6.4 with their measured values; the verdicts are findings and the script
exits 0 whatever they are.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from fastdd.theory import StudyConfig, criteria, get_variant, loglog_slope, make_setting, threshold  # noqa: E402
from fastdd.theory.study import median  # noqa: E402
from fastdd.theory.variants import run_gm_sizes  # noqa: E402

RESULTS = os.path.join(_ROOT, "benchmarks", "results")
FIELDS = ["variant", "d", "r", "seed", "m", "memory", "nmse", "nmse_fresh", "nmse_random", "nmse_ref", "threshold",
          "energy", "min_cos", "cosines", "loss", "seconds"]


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized subset of the grid")
    p.add_argument("--d", type=int, nargs="+", default=None, help="input dimensions (full: 16 32 64)")
    p.add_argument("--r", type=int, nargs="+", default=None, help="intrinsic dimensions (full: 1 2 3 4 6)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (full: 3)")
    p.add_argument("--variants", nargs="+", default=["A", "B", "C", "D"])
    p.add_argument("--c-d", type=int, nargs="+", default=None, help="d values for variant C (full: 16 32)")
    p.add_argument("--c-r", type=int, nargs="+", default=None, help="r values for variant C (full: 1 2 4)")
    p.add_argument("--c-seeds", type=int, default=None, help="seeds 0..N-1 for variant C (full: 1)")
    p.add_argument("--gm-steps", type=int, default=None)
    p.add_argument("--gm-restarts", type=int, default=None)
    p.add_argument("--gm-target", default="stage1", choices=["stage1", "population"],
                   help="variant A matches G(D) on the n1 stage-1 points (default) or, as a diagnostic, the "
                        "stage-1 direction on max(n1_good, 40 d^2) fresh points (a population proxy)")
    p.add_argument("--pm-steps", type=int, default=None)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--link", default="quadratic", choices=["quadratic", "diag"])
    p.add_argument("--all-sizes", action="store_true", help="do not stop at m*")
    p.add_argument("--out", default=os.path.join(RESULTS, "multi_index"), help="output path without extension")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new (d, r, seed) cell after this many minutes; summarise the cells done")
    p.add_argument("--from-csv", default=None,
                   help="run nothing: rebuild the .md, the verdicts and the plots from a CSV this script wrote")
    a = p.parse_args(argv)
    q = a.quick
    a.d = a.d or ([16, 32] if q else [16, 32, 64])
    a.r = a.r or ([1, 2] if q else [1, 2, 3, 4, 6])
    a.seeds = a.seeds or 1 if q else (a.seeds or 3)
    a.c_d = a.c_d or ([16] if q else [16, 32])
    a.c_r = a.c_r or ([1, 2] if q else [1, 2, 4])
    a.c_seeds = min(a.c_seeds or 1, a.seeds)
    a.gm_steps = a.gm_steps or (400 if q else 2000)
    a.gm_restarts = a.gm_restarts or (2 if q else 3)
    a.pm_steps = a.pm_steps or (200 if q else 1000)
    return a


def run(a) -> list:
    t0 = time.perf_counter()
    cells = [(d, r, seed) for d in a.d for r in a.r if r <= d for seed in range(a.seeds)]
    a.cells_done, a.cells_total = 0, len(cells)
    cfg = StudyConfig(width=a.width, link=a.link, gm_steps=a.gm_steps, gm_restarts=a.gm_restarts, pm_steps=a.pm_steps,
                      gm_target=a.gm_target,
                      n1_good=20000 if a.quick else 100000, n_test=4000 if a.quick else 10000)
    rows = []
    for d in a.d:
        for r in a.r:
            if r > d:
                continue
            for seed in range(a.seeds):
                if a.max_minutes is not None and time.perf_counter() - t0 > 60 * a.max_minutes:
                    return rows
                a.cells_done += 1
                s = make_setting(d, r, seed, cfg)
                for name in a.variants:
                    v = get_variant(name)
                    if name == "C" and (d not in a.c_d or r not in a.c_r):
                        continue
                    if name == "C" and seed >= a.c_seeds:
                        continue
                    ref = s.good_reference() if name == "B" else s.reference
                    nref = s.test_nmse(ref)
                    gen = torch.Generator().manual_seed(1000 * seed + ord(name))
                    # A: every size in one batched optimisation (exactly the separate runs, see run_gm_sizes)
                    outcomes = iter(run_gm_sizes(s, v.sizes, gen)) if name == "A" else None
                    for m in v.sizes:
                        o = next(outcomes) if outcomes is not None else v.run(s, m, gen)
                        rows.append(dict(variant=name, d=d, r=r, seed=seed, m=m, memory=o.memory, nmse=o.nmse,
                                         nmse_fresh=o.nmse_fresh, nmse_random=o.nmse_random, nmse_ref=nref,
                                         threshold=threshold(nref), energy=o.energy,
                                         min_cos=min(o.cosines) if o.cosines else math.nan,
                                         cosines=" ".join(f"{c:.3f}" for c in o.cosines), loss=o.loss,
                                         seconds=o.seconds))
                        print(f"{name} d={d:3d} r={r} seed={seed} m={m:3d} NMSE {o.nmse:.4f} (ref {nref:.4f}, "
                              f"random {o.nmse_random:.3f}) E_U {o.energy:.3f} {o.seconds:.1f}s", flush=True)
                        if not a.all_sizes and outcomes is None and o.nmse <= threshold(nref):
                            break
    return rows


def summarise(rows: list) -> list:
    """Per (variant, d, r): medians over seeds of m*, M*, and the metrics at m*."""
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[(row["variant"], row["d"], row["r"], row["seed"])].append(row)
    per_seed = defaultdict(list)
    for (v, d, r, _), rs in by_cell.items():
        hit = next((x for x in sorted(rs, key=lambda x: x["m"]) if x["nmse"] <= x["threshold"]), None)
        per_seed[(v, d, r)].append(hit)
    out = []
    for (v, d, r), hits in sorted(per_seed.items()):
        ok = [h for h in hits if h is not None]

        def med(k):
            return median(h[k] for h in ok)
        ms = med("m")
        out.append(dict(variant=v, d=d, r=r, m_star=ms, M_star=median(h["memory"] for h in ok), energy=med("energy"),
                        min_cos=med("min_cos"), nmse=med("nmse"), nmse_fresh=med("nmse_fresh"),
                        nmse_random=med("nmse_random"), nmse_ref=median(h["nmse_ref"] for h in ok),
                        found=len(ok) / len(hits), d_rel=med("loss") if v == "D" else math.nan))
    return out


def fmt(x, spec=".4g"):
    return "–" if isinstance(x, float) and not math.isfinite(x) else format(x, spec)


def header(info, elapsed, a) -> str:
    """One line: machine, date, commit, wall time (and how much of the grid ran, when cut)."""
    h = (f"{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), torch {info['torch']}, "
         f"{info['date']}, commit {info['commit']}. Wall time {elapsed / 60:.1f} min.")
    if getattr(a, "cells_done", None) is not None and a.cells_done < a.cells_total:
        h += f" Stopped after {a.cells_done} of {a.cells_total} (d, r, seed) cells (--max-minutes {a.max_minutes})."
    return h


def read_csv(path: str):
    """Rows and header line of a CSV written by :func:`write`."""
    ints, texts = {"d", "r", "seed", "m", "memory"}, {"variant", "cosines"}
    with open(path) as f:
        first = f.readline()
        if not first.startswith("# machine: "):
            raise ValueError(f"{path}: not a multi_index CSV (no '# machine:' line)")
        rows = [{k: (v if k in texts else int(v) if k in ints else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]
    return rows, first[len("# machine: "):].strip()


def write(a, rows, summary, crit, head):
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".csv", "w", newline="") as f:
        f.write(f"# machine: {head.split(' Rebuilt from ')[0]}\n")
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in FIELDS})
    lines = ["# Theory check: distilling multi-index tasks", "",
             f"Machine: {head}", "",
             f"Command: `python benchmarks/multi_index.py {' '.join(sys.argv[1:])}`", "",
             f"Grid: d {a.d}, r {a.r}, seeds {a.seeds}, variants {a.variants} (C on d {a.c_d}, r {a.c_r}, "
             f"{a.c_seeds} seed(s)); "
             f"L {a.width}, link {a.link}, GM {a.gm_steps} steps x {a.gm_restarts} restarts (target {a.gm_target}), "
             f"PM {a.pm_steps} steps.",
             "", "## m* per (variant, d, r) (medians over seeds)", "",
             "| variant | d | r | m* | M* | NMSE_ref | NMSE at m* | fresh W0' | random subset | E_U | min cos | seeds with m* |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['d']} | {s['r']} | {fmt(s['m_star'], '.0f')} | {fmt(s['M_star'], '.0f')} | "
                     f"{fmt(s['nmse_ref'])} | {fmt(s['nmse'])} | {fmt(s['nmse_fresh'])} | {fmt(s['nmse_random'], '.3f')} | "
                     f"{fmt(s['energy'], '.3f')} | {fmt(s['min_cos'], '.3f')} | {s['found']:.2f} |")
    lines += ["", "## Pass criteria (spec §6.4)", "", "| criterion | measured | verdict | rule |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']} | {c['verdict']} | {c['note']} |" for c in crit]
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(a, rows, summary):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'fastdd[theory]')")
        return
    base = a.out
    # NMSE against m
    cells = sorted({(r["d"], r["r"]) for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(3 * len(cells), 3), squeeze=False)
    for ax, (d, r) in zip(axes[0], cells):
        for v in ("A", "B", "C"):
            pts = defaultdict(list)
            for x in rows:
                if x["variant"] == v and x["d"] == d and x["r"] == r:
                    pts[x["m"]].append(x["nmse"])
            if pts:
                ms = sorted(pts)
                ax.plot(ms, [median(pts[m]) for m in ms], "o-", label=v)
        refs = [x["nmse_ref"] for x in rows if x["variant"] == "A" and x["d"] == d and x["r"] == r]
        if refs:
            ax.axhline(median(refs), color="k", ls="--", lw=0.8, label="full data (A, C)")
        ax.set_yscale("log")
        ax.set_title(f"d={d}, r={r}", fontsize=9)
        ax.set_xlabel("m")
    axes[0][0].set_ylabel("test NMSE")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + "_nmse.png", dpi=110)
    plt.close(fig)
    # m* vs d and M*/d vs r
    for key, xname, yfn, fname, ref_slope in (
        ("d", "d", lambda s: s["m_star"], "_mstar_d.png", None),
        ("r", "r", lambda s: s["M_star"] / s["d"], "_Mstar_r.png", 2.0),
    ):
        other = "r" if key == "d" else "d"
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for v in ("A", "B", "C"):
            for o in sorted({s[other] for s in summary if s["variant"] == v}):
                pts = sorted((s[key], yfn(s)) for s in summary if s["variant"] == v and s[other] == o
                             and math.isfinite(s["m_star"]))
                if len(pts) >= 2:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, "o-", label=f"{v}, {other}={o} (slope {loglog_slope(xs, ys):.2f})")
        if ref_slope:
            xs = sorted({s["r"] for s in summary})
            if xs:
                ax.plot(xs, [x**2 for x in xs], "k--", lw=0.8, label="r²")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xname)
        ax.set_ylabel("m*" if key == "d" else "M*/d")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(base + fname, dpi=110)
        plt.close(fig)
    # subspace energy at m*
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    found = [s for s in summary if s["variant"] in ("A", "C") and math.isfinite(s["m_star"])]
    xs = sorted({(s["d"], s["r"]) for s in found})  # one shared axis of (d, r) cells for both variants
    for v in ("A", "C"):
        ss = [s for s in found if s["variant"] == v]
        ax.plot([xs.index((s["d"], s["r"])) for s in ss], [s["energy"] for s in ss], "o", label=v)
    ax.set_xticks(range(len(xs)), [f"{d},{r}" for d, r in xs], rotation=90, fontsize=6)
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.set_ylabel("E_U at m*")
    ax.set_xlabel("(d, r)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + "_energy.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse(argv)
    t0 = time.perf_counter()
    if a.from_csv:
        rows, head = read_csv(a.from_csv)
        head += f" Rebuilt from {os.path.basename(a.from_csv)} by --from-csv."
    else:
        info = machine()
        rows = run(a)
    summary = summarise(rows)
    crit = criteria(summary, a.d, a.r)
    elapsed = time.perf_counter() - t0
    if not a.from_csv:
        head = header(info, elapsed, a)
    write(a, rows, summary, crit, head)
    plot(a, rows, summary)
    for c in crit:
        print(f"{c['name']}: {c['verdict']}  {c['value']}  ({c['note']})")
    print(f"wrote {a.out}.csv/.md in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
