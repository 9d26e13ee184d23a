"""Benchmark of the InfoNCE op (fastdd/ops/infonce.py) against the dense torch reference.

    python benchmarks/infonce.py [--quick] [--device cpu|cuda] [--dtype float32 bfloat16] [--threads N]
                                 [--dense-budget-gb G] [--results DIR]

Providers: ``fastdd-<backend>`` for every fastdd backend that runs on the device (cpp and closed_form on CPU;
triton, cuda and closed_form on CUDA), ``torch-eager`` (``infonce_loss_reference``: the dense [Ns, Nr]
matrix, autograd backward) and ``torch-compile`` (``torch.compile`` of that reference).
Modes: fwd, bwd, fwd+bwd, gradients w.r.t. both syn and real. Loss: form="supcon", tau = 0.1,
normalised rows, 100 classes, Ns = Nr.
Sizes: full grid Ns = Nr in {1k, 4k, 16k, 64k} x D in {128, 512, 2048}; ``--quick`` (CPU):
1k/4k at D = 128 and 1k at D = 512 in every mode, 16k at D = 128 in fwd+bwd only.

FLOP count (one figure per mode for every provider, so TFLOP/s compares like with like):
  fwd 2 Ns Nr D (the similarity GEMM), bwd 6 Ns Nr D (dZ_s = dS Z_r and dZ_r = dS^T Z_s: 4 Ns Nr D, plus
  one recompute of S: 2 Ns Nr D), fwd+bwd 8 Ns Nr D. Element-wise work (exp, softplus) is not counted.
  The fused backends actually recompute S once per gradient direction (10 Ns Nr D executed for fwd+bwd),
  the dense reference not at all, so the figure is useful work per second. The notes column carries
  ``tflops`` and ``of_peak`` = TFLOP/s over the device's measured matrix peak (a large fp32 matmul on CPU,
  a 8192^3 matmul in the benchmark dtype on CUDA). ``bytes`` counts the minimum traffic: both inputs read
  (and both gradients written in bwd).

Dense reference beyond memory: on CPU a dense provider is skipped (a row with ``skipped: dense ...``) when
three [Ns, Nr] fp32 matrices exceed ``--dense-budget-gb``; on CUDA an out-of-memory error is caught
and recorded as an ``OOM`` row.

Results are appended to benchmarks/results/infonce.csv and benchmarks/results/infonce.md is regenerated.
"""
from __future__ import annotations

import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402  (also puts the repository root on sys.path)

from fastdd.ops import infonce as ops  # noqa: E402

K = 100
FLOP_FACTOR = {"fwd": 2, "bwd": 6, "fwd+bwd": 8}


def full_grid():
    return [(n, d, m) for n in (1024, 4096, 16384, 65536) for d in (128, 512, 2048) for m in H.MODES]


def quick_grid():
    plan = [(n, d, m) for n, d in ((1024, 128), (4096, 128), (1024, 512)) for m in H.MODES]
    return plan + [(16384, 128, "fwd+bwd")]


def make_inputs(n, d, device, dtype):
    g = torch.Generator().manual_seed(0)
    syn = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    real = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    sl = (torch.arange(n) % K).to(device)
    rl = (torch.arange(n) % K)[torch.randperm(n, generator=g)].to(device)
    return syn, sl, real, rl


@functools.cache
def matrix_peak_tflops(device_str: str, dtype_name: str) -> float:
    device = torch.device(device_str)
    dtype = getattr(torch, dtype_name) if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(1000))
    b = torch.randn(n, n, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(1001))
    t = H.time_call(lambda: a @ b, device, quick=True)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def skip_row(op, provider, mode, size, dtype, device, note):
    row = {c: "" for c in H.COLUMNS}
    row.update(op=op, provider=provider, mode=mode, size=size, dtype=str(dtype).replace("torch.", ""),
               median_ms="nan", p20_ms="nan", p80_ms="nan", runs=0, notes=note)
    row.update(H.environment(device))
    return row


def run(args) -> list:
    device = torch.device(args.device)
    plan = quick_grid() if args.quick else full_grid()
    rows = []
    ref = functools.partial(ops.infonce_loss_reference, temperature=0.1)
    compiled = torch.compile(ref, dynamic=False)
    print(f"device: {H.device_name(device)}", flush=True)
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        peak = matrix_peak_tflops(str(device), dtype_name)
        print(f"{dtype_name}: matrix peak {peak:.3f} TFLOP/s", flush=True)
        cache = {}
        for n, d, mode in plan:
            if (n, d) not in cache:
                cache.clear()
                cache[(n, d)] = make_inputs(n, d, device, dtype)
            syn, sl, real, rl = cache[(n, d)]
            size = f"N={n // 1024}k,D={d}"
            flops = FLOP_FACTOR[mode] * n * n * d
            nbytes = 2 * n * d * syn.element_size() * (2 if mode != "fwd" else 1)
            providers = []
            for backend in H.fastdd_backends(ops._OP, device):
                if backend == "closed_form" and args.quick and n > 4096:
                    continue
                providers.append((f"fastdd-{backend}", lambda b=backend: ops.infonce_loss(
                    syn, sl, real, rl, backend=b, validate=False)))
            providers.append(("torch-eager", lambda: ref(syn, sl, real, rl)))
            providers.append(("torch-compile", lambda: compiled(syn, sl, real, rl)))
            for name, fn in providers:
                dense = name.startswith("torch-")
                if dense and device.type == "cpu" and 3 * n * n * 4 > args.dense_budget_gb * 2**30:
                    note = (f"skipped: dense {n}x{n} fp32 matrix x3 = {3 * n * n * 4 / 2**30:.1f} GiB > "
                            f"budget {args.dense_budget_gb} GiB")
                    rows.append(skip_row("infonce", name, mode, size, dtype, device, note))
                    print(f"{size:14s} {mode:8s} {name:14s} {note}", flush=True)
                    continue
                t0 = time.perf_counter()
                try:
                    row = H.measure(op="infonce", provider=name, mode=mode, size=size, dtype=dtype, device=device,
                                    fn=fn, inputs=[syn, real], nbytes=nbytes, quick=args.quick,
                                    min_run_time=0.2 if args.quick else 1.0)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append(skip_row("infonce", name, mode, size, dtype, device, "OOM"))
                    print(f"{size:14s} {mode:8s} {name:14s} OOM", flush=True)
                    continue
                tflops = flops / (row["median_ms"] * 1e-3) / 1e12
                extra = f"tflops={tflops:.4f}; of_peak={tflops / peak:.3f}; peak_tflops={peak:.3f}"
                if device.type == "cpu":
                    extra += f"; threads={torch.get_num_threads()}"
                row["notes"] = extra
                rows.append(row)
                print(f"{size:14s} {mode:8s} {name:14s} {row['median_ms']:10.3f} ms {tflops:8.4f} TFLOP/s "
                      f"({tflops / peak:.3f} of peak) peak mem {row['peak_mem_mb']} MiB "
                      f"[{time.perf_counter() - t0:.1f}s]", flush=True)
    return rows


def main(argv=None) -> None:
    parser = H.op_parser(__doc__.split("\n")[0], "infonce", quick_help="reduced grid and shorter timing budgets",
                         dtype_default=None, dtype_help="default: float32 on CPU, float32 and bfloat16 on CUDA")
    parser.add_argument("--dense-budget-gb", type=float, default=2.0,
                        help="CPU: skip dense providers whose three [N, N] fp32 matrices exceed this")
    args = H.parse_op_args(parser, argv)
    if args.dtype is None:
        args.dtype = ["float32"] if args.device == "cpu" else ["float32", "bfloat16"]
    H.write_op_results(args, run(args), "infonce", "InfoNCE (fastdd/ops/infonce.py)")


if __name__ == "__main__":
    main()
