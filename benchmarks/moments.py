"""Benchmark of the feature-moment op (fastdd/ops/feature_moments.py).

    python benchmarks/moments.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                 [--ops moment_loss,class_moments,bn_stat_loss,gram_loss] [--threads N]

The committed CPU results were taken with ``--threads 1`` on a 2-core host shared with other jobs: with
two OpenMP threads, a descheduled peer makes every parallel region wait, which distorted all providers.

Providers: every fastdd backend that runs on the device except ``torch`` (which *is* the reference):
``fastdd-cpp`` / ``fastdd-triton`` / ``fastdd-cuda``; ``torch-eager`` (the ``*_reference`` functions) and
``torch-compile`` (``torch.compile`` of the same reference, default Inductor). Modes fwd, bwd, fwd+bwd
(the real-side statistics pass ``class_moments`` is forward only, without autograd, as DDM uses it).

Sizes (K = 10 classes, labels balanced and shuffled):

=============  ===============================================  =============================================
op             cuda                                             cpu (reduced so the run ends in < 3 minutes)
=============  ===============================================  =============================================
moment_loss    synthetic maps [2560,128,32,32], [2560,128,16,16] CIFAR synthetic side: [100,128,32,32]
               (batchavg and persample; real stats given)        (IPC 10), [500,128,16,16] (IPC 50)
class_moments  real maps [2560,128,32,32], [2560,128,16,16]      real side: [1280,128,32,32], [2560,128,16,16]
bn_stat_loss   ResNet-18 BN inputs at 224^2, N = 128:            the same layers with N = 8
               [N,64,112,112], [N,128,28,28], [N,256,14,14],
               [N,512,7,7]
gram_loss      [2560,128,16,16] (batchavg Gram, L_CM)            [500,128,16,16]
=============  ===============================================  =============================================

Byte model (the minimum traffic of a fused implementation; the same count is used for every provider, so
GB/s is an *effective* bandwidth): fwd reads x once (elt bytes per element); bwd writes dx and reads x
(persample, BN) or the fp32 class map A [K,C,P] (batchavg); the Gram backward reads x and writes dx.
Statistics, labels and coefficients ([K,C] / [N,C]) are not counted. ``bw_fraction`` divides by the
measured copy bandwidth (``benchmarks/_harness.py``).

Results are appended to ``benchmarks/results/moments.csv`` and ``benchmarks/results/moments.md`` is
regenerated. On the CPU, large fresh outputs cost page faults (first touch); the fused C++ kernels ask
for transparent huge pages for them (``madvise``), torch's allocator does so only with
``THP_MEM_ALLOC_ENABLE=1``; the ``notes`` column records that setting.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks import _harness as H  # noqa: E402
from fastdd.ops import feature_moments as fm  # noqa: E402

RESULTS = os.path.join(_ROOT, "benchmarks", "results")
CSV = os.path.join(RESULTS, "moments.csv")
MD = os.path.join(RESULTS, "moments.md")
K = 10


def sizes(device_type: str):
    if device_type == "cuda":
        return {
            "moment_loss": [(2560, 128, 32, 32), (2560, 128, 16, 16)],
            "class_moments": [(2560, 128, 32, 32), (2560, 128, 16, 16)],
            "bn_stat_loss": [(128, 64, 112, 112), (128, 128, 28, 28), (128, 256, 14, 14), (128, 512, 7, 7)],
            "gram_loss": [(2560, 128, 16, 16)],
        }
    return {
        "moment_loss": [(100, 128, 32, 32), (500, 128, 16, 16)],
        "class_moments": [(1280, 128, 32, 32), (2560, 128, 16, 16)],
        "bn_stat_loss": [(8, 64, 112, 112), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)],
        "gram_loss": [(500, 128, 16, 16)],
    }


def make_input(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g).relu_().to(dtype=dtype, device=device)
    labels = (torch.arange(shape[0]) % K)[torch.randperm(shape[0], generator=g)].to(device)
    return x, labels


def size_str(shape):
    return "x".join(str(s) for s in shape)


def providers(device_type: str):
    from benchmarks._harness import fastdd_backends

    names = [f"fastdd-{b}" for b in fastdd_backends("feature_moments", device_type)]
    return names + ["torch-eager", "torch-compile"]


# Reference computations with every tensor as an argument, so one torch.compile object per op serves all
# sizes and modes (Dynamo recompiles on a new mode / shape; on the CPU the default automatic-dynamic
# shapes keep that to a couple of compiles, on CUDA shapes are static).
# (Half inputs are upcast inside, as the fused ops accumulate in fp32.)
def _f32(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _ml_ref(x, labels, mean, std, mode):
    return fm.moment_loss_reference([_f32(x)], labels, [(mean, std)], K, mode=mode)


def _cm_ref(x, labels, mode):
    return fm.class_moments_reference(_f32(x), labels, K, mode=mode)[1]


def _bn_ref(x, rm, rv):
    return fm.bn_stat_loss_reference(_f32(x), rm, rv)


def _gram_ref(x, labels, gram):
    return fm.gram_loss_reference([_f32(x)], labels, [gram], K)


_COMPILED = {}


def _provider_fn(provider, ref, fused, args, device):
    """Zero-argument callable: the fused op for fastdd-*, the reference eagerly or compiled."""
    if provider.startswith("fastdd-"):
        backend = provider.split("-", 1)[1]
        return lambda: fused(backend)
    if provider == "torch-compile":
        if ref not in _COMPILED:
            _COMPILED[ref] = torch.compile(ref, dynamic=False if device.type == "cuda" else None)
        compiled = _COMPILED[ref]
        return lambda: compiled(*args)
    return lambda: ref(*args)


def cases(device, dtype, ops):
    """Yield (op, size, modes, factory(provider) -> fn, grad inputs, bytes per mode)."""
    dev = torch.device(device)
    elt = torch.empty((), dtype=dtype).element_size()
    table = sizes(dev.type)
    if "moment_loss" in ops:
        for shape in table["moment_loss"]:
            N, C, H_, W = shape
            P = H_ * W
            x, labels = make_input(shape, dtype, device)
            real, rl = make_input((max(2 * N, 20),) + shape[1:], dtype, device, seed=1)
            for mode in fm.MODES:
                with torch.no_grad():
                    mean, std = (t.float() for t in fm.class_moments_reference(_f32(real), rl, K, mode=mode))
                xs = x.clone().requires_grad_(True)
                src = K * C * P * 4 if mode == "batchavg" else N * C * P * elt
                nbytes = {"fwd": N * C * P * elt, "bwd": src + N * C * P * elt}
                nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]

                def factory(provider, xs=xs, labels=labels, mean=mean, std=std, mode=mode):
                    def fused(b):
                        return fm.moment_loss([xs], labels, [(mean, std)], K, mode=mode, backend=b, validate=False)
                    return _provider_fn(provider, _ml_ref, fused, (xs, labels, mean, std, mode), dev)

                yield "moment_loss", f"{size_str(shape)} {mode}", ("fwd", "bwd", "fwd+bwd"), factory, [xs], nbytes
    if "class_moments" in ops:
        for shape in table["class_moments"]:
            x, labels = make_input(shape, dtype, device, seed=2)
            for mode in fm.MODES:
                def factory(provider, x=x, labels=labels, mode=mode):
                    def fused(b):
                        return fm.class_moments(x, labels, K, mode=mode, backend=b, validate=False)[1]
                    return _provider_fn(provider, _cm_ref, fused, (x, labels, mode), dev)

                yield "class_moments", f"{size_str(shape)} {mode}", ("fwd",), factory, [], {"fwd": x.numel() * elt}
    if "bn_stat_loss" in ops:
        for shape in table["bn_stat_loss"]:
            x, _ = make_input(shape, dtype, device, seed=3)
            C = shape[1]
            rm = torch.randn(C, device=device) * 0.1
            rv = torch.rand(C, device=device) + 0.5
            xs = x.clone().requires_grad_(True)
            n = x.numel() * elt

            def factory(provider, xs=xs, rm=rm, rv=rv):
                def fused(b):
                    return fm.bn_stat_loss(xs, rm, rv, backend=b)
                return _provider_fn(provider, _bn_ref, fused, (xs, rm, rv), dev)

            yield "bn_stat_loss", size_str(shape), ("fwd", "bwd", "fwd+bwd"), factory, [xs], \
                {"fwd": n, "bwd": 2 * n, "fwd+bwd": 3 * n}
    if "gram_loss" in ops:
        for shape in table["gram_loss"]:
            x, labels = make_input(shape, dtype, device, seed=4)
            real, rl = make_input(shape, dtype, device, seed=5)
            with torch.no_grad():
                gram = fm.class_gram_reference(_f32(real), rl, K)
            xs = x.clone().requires_grad_(True)
            n = x.numel() * elt

            def factory(provider, xs=xs, labels=labels, gram=gram):
                def fused(b):
                    return fm.gram_loss([xs], labels, [gram], K, backend=b, validate=False)
                return _provider_fn(provider, _gram_ref, fused, (xs, labels, gram), dev)

            yield "gram_loss", size_str(shape), ("fwd", "bwd", "fwd+bwd"), factory, [xs], \
                {"fwd": n, "bwd": 2 * n, "fwd+bwd": 3 * n}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timing budget (smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ops", default="moment_loss,class_moments,bn_stat_loss,gram_loss")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch intra-op threads (default: torch's); on a shared host 1 avoids "
                             "OpenMP threads waiting on descheduled peers. Recorded in the device name.")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        parser.error("--dtype: the CPU run uses float32")
    ops = set(args.ops.split(","))
    min_run_time = None if device.type == "cuda" else (0.1 if args.quick else 0.3)
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    notes = f"K={K}"
    if device.type == "cpu":
        notes += f"; THP_MEM_ALLOC_ENABLE={thp}; load avg at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    provs = providers(device.type)
    print(f"device {H.device_name(device)}; providers {provs}; copy bandwidth "
          f"{H.copy_bandwidth(device):.1f} GB/s", flush=True)
    rows = []
    for op, size, modes, factory, inputs, nbytes in cases(device, dtype, ops):
        for provider in provs:
            fn = factory(provider)
            for mode in modes:
                if device.type == "cpu" and provider == "torch-compile" and mode == "bwd":
                    continue  # the compiled fwd+bwd already covers it on the CPU budget
                try:
                    row = H.measure(op=op, provider=provider, mode=mode, size=size, dtype=dtype, fn=fn,
                                    inputs=inputs, device=device, nbytes=nbytes.get(mode), quick=args.quick,
                                    min_run_time=min_run_time, notes=notes)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{op:14s} {size:28s} {mode:8s} {provider:14s}  out of memory", flush=True)
                    continue
                rows.append(row)
                print(f"{op:14s} {size:28s} {mode:8s} {provider:14s} {row['median_ms']:10.3f} ms "
                      f"{row['gbps']:8.1f} GB/s  peak {row['peak_mem_mb']} MiB", flush=True)
    if not args.no_write:
        H.append_rows(CSV, rows)
        H.write_markdown(CSV, MD, "fastdd feature-moment op benchmarks (benchmarks/moments.py)")
    # summary: fused backend vs eager, fwd+bwd (or fwd for the stats pass)
    base = {(r["op"], r["size"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "torch-eager"}
    print("\nspeed-up over torch-eager (median):")
    for r in rows:
        if r["provider"].startswith("fastdd-") and r["mode"] in ("fwd+bwd",) or (
                r["provider"].startswith("fastdd-") and r["op"] == "class_moments"):
            b = base.get((r["op"], r["size"], r["mode"]))
            if b:
                print(f"  {r['op']:14s} {r['size']:28s} {r['mode']:8s} {r['provider']:14s} {b / r['median_ms']:6.2f}x")


if __name__ == "__main__":
    main()
