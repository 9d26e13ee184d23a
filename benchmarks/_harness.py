"""Shared helpers for fastdd's benchmarks: the op benchmarks (``benchmarks/<op>.py``) and the end-to-end
and comparison scripts.

Stable API (other benchmark scripts import it):

* :func:`environment` (device) -> dict with ``device``, ``date``, ``torch``, ``triton``, ``commit``.
* :func:`default_device` and :func:`check_device`: the ``--device`` default and check of every benchmark;
  :func:`add_budget_options`, the options of the shared-budget Fashion-MNIST comparisons.
* :func:`resolve_variant` (name, overrides, fallback): the method a comparison row runs, if any.
* :func:`fastdd_backends` (op, device) -> the fastdd backends that can run ``op`` there.
* :func:`make_call` (fn, inputs, mode) -> a zero-argument callable for ``mode`` in :data:`MODES`.
* :func:`time_call` (call, device, *, quick) -> :class:`Timing` (median / p20 / p80 in ms, runs).
* :func:`cpu_time_ms` (call) -> median CPU time of the calling thread (CPU, preemption-free).
* :func:`peak_memory` (call, device) -> (bytes, what): how much memory one call needed above the
  memory in use before it, and a string saying what was measured (see below).
* :func:`copy_bandwidth` (device) -> measured copy bandwidth in GB/s (a large tensor copied into a
  preallocated one, i.e. ``clone()`` without the page faults of a fresh allocation; read + write bytes
  counted), cached per device.
* :func:`measure` (...) -> one result row (dict with :data:`COLUMNS`) combining all of the above.
* :func:`append_rows` (csv_path, rows[, columns]), :func:`append_text` (path, text) and
  :func:`write_markdown` (csv_path, md_path, title); :func:`report_head`, the head of a run's section in
  an appended Markdown report.
* :func:`op_parser`, :func:`parse_op_args`, :func:`write_op_results`: the command line and the results
  files of ``benchmarks/{mmd,infonce,lowrank}.py``; :func:`cpu_notes` and :func:`timing_text`, the notes
  column and the printed timing of a row.

Timing: on CUDA ``triton.testing.do_bench`` (median and 20/80 % quantiles, warm-up included; gradients
are returned, never accumulated); on CPU ``torch.utils.benchmark.Timer.blocked_autorange`` with all of
torch's intra-op threads, the quantiles taken over its timing blocks.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the
memory allocated before the call (exact for the caching allocator). On CPU there is no allocator
counter, so we report the rise of the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) after ``malloc_trim``; this is a *lower bound* (pages that stay resident from
earlier calls are reused without raising it) and is labelled ``rss-hwm-delta`` in the results.

Bandwidth: ``GB/s = bytes / median time`` from an explicit byte count supplied by the benchmark (it
documents its count), and ``bw_fraction = GB/s / copy_bandwidth(device)``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
import gc
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch._dynamo

# The benchmarks reuse one ``torch.compile`` object across many shapes (dynamic=False): past dynamo's
# recompile limit (8 by default) it silently falls back to eager, and a "torch-compile" row would time
# eager code. Raise the limit well above the largest grid.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 256)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as `python benchmarks/<op>.py` from a source tree
    sys.path.insert(0, _ROOT)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16", "float16")

COLUMNS = (
    "op", "provider", "mode", "size", "dtype", "median_ms", "p20_ms", "p80_ms", "runs",
    "bytes", "gbps", "bw_fraction", "copy_gbps", "peak_mem_mb", "mem_kind",
    "device", "date", "torch", "triton", "commit", "notes",
)


# ----------------------------------------------------------------------------------------- environment
def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            match = re.search(r"model name\s*:\s*(.+)", fh.read())
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short hash of HEAD (`git rev-parse --short HEAD`), or 'uncommitted' when there is no commit."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return "uncommitted"
        return head.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


@functools.cache
def _environment(device_type: str, index: int) -> tuple:
    device = torch.device(device_type, index) if device_type == "cuda" else torch.device("cpu")
    return (
        ("device", device_name(device)),
        ("date", _dt.datetime.now().strftime("%Y-%m-%d %H:%M")),
        ("torch", torch.__version__),
        ("triton", triton_version()),
        ("commit", git_commit()),
    )


def environment(device) -> Dict[str, str]:
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return dict(_environment(device.type, index))


def fastdd_backends(op: str, device) -> List[str]:
    """fastdd backends able to run ``op`` on ``device`` (triton on CPU only under TRITON_INTERPRET=1), less
    ``torch``: that backend is the plain reference, which the benchmarks time as their eager provider."""
    from fastdd.ops._backend import BACKENDS, backend_available

    device_type = torch.device(device).type
    return [b for b in BACKENDS if b != "torch" and backend_available(b, device_type, op)]


def default_device() -> str:
    """The ``--device`` default of every benchmark: ``cuda`` where torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_budget_options(p: argparse.ArgumentParser, *, iterations: int) -> argparse.ArgumentParser:
    """The options of the small shared-budget Fashion-MNIST runs (compare_methods, continual): distillation
    budget (``--iterations``, ``--batch-real``), evaluation (``--epochs``, ``--models``, ``--test-per-class``),
    ``--seed``, ``--data-path``, ``--device``, ``--quick``, ``--no-write``."""
    p.add_argument("--iterations", type=int, default=iterations)
    p.add_argument("--batch-real", type=int, default=32)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-path", default=None)
    p.add_argument("--device", default=default_device())
    p.add_argument("--quick", action="store_true", help="tiny budget, only to check that the script works")
    p.add_argument("--no-write", action="store_true", help="print the table, do not append to benchmarks/results")
    return p


def check_device(device) -> None:
    """Refuse a CUDA ``device`` on a machine without one (``SystemExit`` with one line)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")


def resolve_variant(name: str, overrides: Dict[str, object], fallback=None):
    """(method name, overrides) of a benchmark row: ``name`` with ``overrides`` if that method is registered
    and its config has every overridden field, else ``fallback`` ((method, overrides) or None) under the same
    test; (None, None) when neither can run in this checkout."""
    from fastdd import methods

    for cand, ov in [(name, overrides)] + ([fallback] if fallback else []):
        if cand in methods.names():
            fields = {f.name for f in dataclasses.fields(methods.get(cand).config_cls)}
            if all(k in fields for k in ov):
                return cand, ov
    return None, None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- the calls
def make_call(fn: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str) -> Callable[[], object]:
    """A zero-argument callable measuring ``mode`` of ``fn``.

    ``fn()`` returns a tensor, or a tuple of tensors, computed from ``inputs`` (the tensors that get
    gradients); the backward seeds every output with ones.
    fwd: ``fn()`` under ``no_grad`` only when no input requires grad, otherwise with autograd recording
    (what a training step pays); bwd: ``torch.autograd.grad`` of one saved forward (graph retained);
    fwd+bwd: both.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    inputs = list(inputs)

    def as_tuple(out):
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    if mode == "fwd":
        return fn
    if mode == "fwd+bwd":
        def fwd_bwd():
            outs = as_tuple(fn())
            return torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
        return fwd_bwd
    outs = as_tuple(fn())
    grads = [torch.ones_like(o) for o in outs]

    def bwd():
        return torch.autograd.grad(outs, inputs, grads, retain_graph=True)
    return bwd


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def time_call(call: Callable[[], object], device, *, quick: bool = False,
              min_run_time: Optional[float] = None) -> Timing:
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        rep = 25 if quick else 100
        med, p20, p80 = triton.testing.do_bench(call, warmup=10 if quick else 25, rep=rep, quantiles=[0.5, 0.2, 0.8])
        # do_bench picks its own repeat count from rep (ms) and the estimated time of one call
        return Timing(float(med), float(p20), float(p80), -1)
    from torch.utils import benchmark

    call()  # warm-up (first-call allocations, lazy init, compilation)
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    budget = min_run_time if min_run_time is not None else (0.2 if quick else 1.0)
    m = timer.blocked_autorange(min_run_time=budget)
    times = sorted(m.times)

    def q(p):
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return Timing(m.median * 1e3, q(0.2) * 1e3, q(0.8) * 1e3, len(times) * m.number_per_run)


def cpu_time_ms(call: Callable[[], object], runs: int = 20) -> float:
    """Median CPU time (ms) of the calling thread over ``runs`` calls: unaffected by preemption, so on a
    shared machine it is the better estimate of a *single-threaded* call's wall time (with more torch
    threads it misses the workers' time and counts spin-waiting)."""
    import time

    call()
    samples = []
    for _ in range(runs):
        t0 = time.thread_time()
        call()
        samples.append(time.thread_time() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e3


def cpu_notes(call: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str, device,
              runs: int) -> str:
    """The notes of a row measured on the CPU: the thread count and, with one thread, the median CPU time of
    that thread over ``runs`` calls of ``mode`` (:func:`cpu_time_ms`: on a shared machine the trustworthy
    figure, wall-clock medians include preemption). Empty on CUDA."""
    if torch.device(device).type != "cpu":
        return ""
    if torch.get_num_threads() != 1:
        return f"threads={torch.get_num_threads()}"
    cpu = cpu_time_ms(make_call(call, inputs, mode), runs=runs)
    return f"threads=1; main-thread cpu median {cpu:.3f} ms"


def _malloc_trim() -> None:
    """Return glibc's free heap to the kernel (nothing elsewhere), through fastdd's one libc lookup."""
    from fastdd.allocator import _glibc

    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _rss_kib() -> Dict[str, int]:
    with open("/proc/self/status") as fh:
        text = fh.read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def peak_memory(call: Callable[[], object], device) -> tuple:
    """(bytes, kind): extra memory one ``call()`` needed at its peak; see the module docstring."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak, "cuda-max-allocated"
    try:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _rss_kib()["VmRSS"]
        result = call()
        peak = (_rss_kib()["VmHWM"] - before) * 1024
        del result
        return max(peak, 0), "rss-hwm-delta"
    except OSError:
        return float("nan"), "unavailable"


@functools.cache
def _copy_bandwidth(device_str: str) -> float:
    device = torch.device(device_str)
    nbytes = (512 if device.type == "cuda" else 64) * 2**20
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = time_call(lambda: y.copy_(x), device, quick=True)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9  # read + write


def copy_bandwidth(device) -> float:
    """GB/s of a large copy (``clone()`` into a preallocated tensor) on ``device`` (read + write bytes),
    measured once per process."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _copy_bandwidth(str(device))


def measure(
    *, op: str, provider: str, mode: str, size: str, dtype, fn: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor], device, nbytes: Optional[int] = None, quick: bool = False,
    min_run_time: Optional[float] = None, notes: str = "",
) -> Dict[str, object]:
    """Time ``mode`` of ``fn`` and its peak memory; return one row with :data:`COLUMNS`."""
    call = make_call(fn, inputs, mode)
    timing = time_call(call, device, quick=quick, min_run_time=min_run_time)
    mem, kind = peak_memory(call, device)
    copy_gbps = copy_bandwidth(device)
    gbps = nbytes / (timing.median_ms * 1e-3) / 1e9 if nbytes else float("nan")
    row = {
        "op": op, "provider": provider, "mode": mode, "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": round(timing.median_ms, 4), "p20_ms": round(timing.p20_ms, 4),
        "p80_ms": round(timing.p80_ms, 4), "runs": timing.runs,
        "bytes": nbytes if nbytes else "", "gbps": round(gbps, 2),
        "bw_fraction": round(gbps / copy_gbps, 3) if nbytes else "", "copy_gbps": round(copy_gbps, 2),
        "peak_mem_mb": round(mem / 2**20, 2) if mem == mem else "", "mem_kind": kind, "notes": notes,
    }
    row.update(environment(device))
    return row


def timing_text(row: Dict[str, object]) -> str:
    """A row's median, p20/p80 and GB/s as the op benchmarks print them."""
    return (f"{row['median_ms']:10.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f}) "
            f"{row['gbps']:7.2f} GB/s")


# --------------------------------------------------------------------------------------------- results
def append_rows(csv_path: str, rows: Iterable[Dict[str, object]], columns: Sequence[str] = COLUMNS) -> None:
    """Append ``rows`` to ``csv_path``, the values of ``columns`` (default :data:`COLUMNS`; a missing one
    is left empty), the header written when the file is new or empty."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


def report_head(subject: str, budget: str, env: Dict[str, str], intro: str, script: str, *, quick: bool,
                triton: bool = True) -> List[str]:
    """The first lines of one run's section in an appended Markdown report: ``## subject, budget: device,
    date, versions, commit`` (``budget`` reads "quick check (NOT a result)" for a ``quick`` run), then
    ``intro`` and the command that produced it (``python benchmarks/<script> <arguments>``)."""
    title = "quick check (NOT a result)" if quick else budget
    versions = f"torch {env['torch']}, " + (f"triton {env['triton']}, " if triton else "")
    return [f"## {subject}, {title}: {env['device']}, {env['date']}, {versions}commit {env['commit']}", "",
            f"{intro} Produced by `python benchmarks/{script} {' '.join(sys.argv[1:])}`.", ""]


def append_text(path: str, text: str) -> None:
    """Append ``text`` and a newline to ``path`` (its folder created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        fh.write(text + "\n")


def read_rows(csv_path: str) -> List[Dict[str, str]]:
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_markdown(csv_path: str, md_path: str, title: str, *, baseline: str = "torch-eager") -> None:
    """Regenerate ``md_path`` from the CSV: the latest row of each (device, op, size, dtype, mode,
    provider), grouped by device, with the speed-up over ``baseline`` in the same group."""
    rows = read_rows(csv_path)
    latest: Dict[tuple, Dict[str, str]] = {}
    for row in rows:
        key = (row["device"], row["op"], row["size"], row["dtype"], row["mode"], row["provider"])
        latest.pop(key, None)
        latest[key] = row  # keep the last one, in CSV order
    lines = [f"# {title}", "", f"Generated from `{os.path.basename(csv_path)}` (all runs are kept there; "
             "this table shows the latest row per configuration).", ""]
    by_device: Dict[str, List[Dict[str, str]]] = {}
    for row in latest.values():
        by_device.setdefault(row["device"], []).append(row)
    for device, drows in by_device.items():
        newest = max(drows, key=lambda r: r["date"])
        lines += [f"## {device}", "",
                  f"latest run: {newest['date']}, torch {newest['torch']}, triton {newest['triton']}, "
                  f"commit {newest['commit']}; copy bandwidth {newest['copy_gbps']} GB/s; "
                  f"memory: {newest['mem_kind']}", ""]
        lines.append("| op | size | dtype | mode | provider | median ms | p20-p80 ms | GB/s | of copy bw "
                     f"| speed-up vs {baseline} | peak MiB | date | commit | notes |")
        lines.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|")
        base = {(r["op"], r["size"], r["dtype"], r["mode"]): float(r["median_ms"])
                for r in drows if r["provider"] == baseline}
        for r in sorted(drows, key=lambda r: (r["op"], r["size"], r["dtype"], MODES.index(r["mode"])
                                                  if r["mode"] in MODES else 9, r["provider"])):
            b = base.get((r["op"], r["size"], r["dtype"], r["mode"]))
            speed = f"{b / float(r['median_ms']):.2f}x" if b else ""
            lines.append(
                f"| {r['op']} | {r['size']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['median_ms']} "
                f"| {r['p20_ms']}-{r['p80_ms']} | {r['gbps']} | {r['bw_fraction']} | {speed} "
                f"| {r['peak_mem_mb']} | {r['date']} | {r['commit']} | {r.get('notes') or ''} |"
            )
        lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as fh:
        fh.write("\n".join(lines))


# ------------------------------------------------------------------------------ op benchmark scripts
def op_parser(description: str, stem: str, *, quick_help: str, dtype_default: Optional[Sequence[str]] = ("float32",),
              dtype_help: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every op benchmark takes (``--quick --device --dtype --threads --results``, the folder of
    ``<stem>.csv`` / ``<stem>.md``); the script adds its own, then calls :func:`parse_op_args`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=None if dtype_default is None else list(dtype_default),
                        choices=list(DTYPES), help=dtype_help)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--results", default=RESULTS, help=f"folder of {stem}.csv / {stem}.md (default: %(default)s)")
    return parser


def parse_op_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse the options of :func:`op_parser`: refuse ``--device cuda`` without a GPU, apply ``--threads``."""
    args = parser.parse_args(argv)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_op_results(args: argparse.Namespace, rows: List[Dict[str, object]], stem: str, title: str) -> None:
    """Append ``rows`` to ``<args.results>/<stem>.csv`` and regenerate ``<stem>.md`` from it."""
    csv_path, md_path = os.path.join(args.results, f"{stem}.csv"), os.path.join(args.results, f"{stem}.md")
    append_rows(csv_path, rows)
    write_markdown(csv_path, md_path, title)
    print(f"appended {len(rows)} rows to {csv_path}; wrote {md_path}")
