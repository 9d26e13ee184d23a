"""Helpers shared by the tests: the method-quality assertion, a generated ImageNet-layout tree of real
image files, a counter of the image folders' decodes, torchrun launching, the compiled-vs-eager check of the ops."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def assert_beats_initial_subset(method, train, test, cfg, margin: float, test_size: int = 200) -> dict:
    """Evaluate ``method``'s distilled set (``cfg``: an ``EvalConfig``) on a stratified ``test_size``
    subset of ``test`` and assert its mean accuracy beats the same-size real subset it started from
    (``init_indices``) by at least ``margin`` percentage points. Returns the result dict."""
    from fastdd.data import stratified_subset
    from fastdd.evaluate import evaluate_synset

    syn = method.synthetic_set()
    result = evaluate_synset(syn["images"], syn["labels"], train, stratified_subset(test, test_size), cfg,
                             baseline_indices=syn["init_indices"])
    d = result.to_dict()
    print(result.summary())
    assert d["accuracy_mean"] >= d["random_baseline_mean"] + margin, d
    return d


# ------------------------------------------------------------------------------------------------ image trees
CLASSES = ("n01440764", "n01443537", "n01484850")
SIZES = ((40, 30), (50, 64), (33, 47), (64, 50), (30, 40))  # (W, H) as Pillow counts


def write_image(path: Path, rng: np.random.Generator, wh, mode: str = "RGB", fmt: str = "JPEG") -> None:
    """Write a real image file of ``wh = (W, H)`` pixels at ``path`` (Pillow; RGB or L; JPEG quality 90 or PNG)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = wh
    # a smooth gradient plus noise: real JPEG content (not a flat colour) that survives compression
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], -1)
    arr = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode == "L":
        im = im.convert("L")
    im.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_tree(root: Path, per_class=(5, 5, 5), val_per_class=4, seed=0) -> Path:
    """An ImageNet-layout tree of real JPEGs (plus one PNG, one grayscale JPEG, one nested folder)."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", per_class), ("val", (val_per_class,) * len(CLASSES))):
        for c, (wnid, n) in enumerate(zip(CLASSES, counts)):
            for i in range(n):
                name = f"{wnid}_{i:04d}.JPEG" if i % 2 else f"{wnid}_{i:04d}.jpg"
                sub = Path("extra") if (split == "train" and c == 1 and i == 3) else Path()
                write_image(root / split / wnid / sub / name, rng, SIZES[(i + c) % len(SIZES)])
    write_image(root / "train" / CLASSES[0] / "gray_0000.jpeg", rng, (44, 36), mode="L")
    write_image(root / "train" / CLASSES[2] / "img_png.png", rng, (37, 29), fmt="PNG")
    (root / "train" / CLASSES[0] / "README.txt").write_text("not an image")
    return root


def count_decoded_files(monkeypatch) -> list:
    """Patch :mod:`fastdd.data.folder`'s Pillow decoder so that every decoded file's path is appended to the
    returned list (the eager reader, ``LazyImageFolder`` with ``decoder="pil"`` and its threads alike)."""
    from fastdd.data import folder as folder_mod

    opened = []
    real = folder_mod._decode_pil

    def counting(path, *args):
        opened.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(folder_mod, "_decode_pil", counting)
    return opened


def make_kd_set_dir(root: Path, train, per_class: int) -> Path:
    """``root``/teacher (a ConvNetBN teacher squeezed 1 epoch on ``train``) and ``root``/set (a
    `fastdd distill`-style SRe2L directory of the first ``per_class`` real images of each class, naming that
    teacher); returns ``root``."""
    import torch

    from fastdd.squeeze import SqueezeConfig, squeeze
    from fastdd.synset import save_synset

    squeeze(train, SqueezeConfig(model="ConvNetBN", epochs=1, batch_size=64, lr=0.01), root / "teacher",
            progress=False)
    idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:per_class] for c in range(train.num_classes)])
    save_synset(root / "set", {"images": train.images[idx], "labels": train.labels[idx]},
                {"ipc": per_class, "model": "ConvNetW32", "teacher": str(root / "teacher")},
                {"dataset": train.name, "method": "sre2l", "mean": list(train.mean), "std": list(train.std)})
    return root


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a torchrun rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node NPROC ARGS`` from the repository root, one thread per
    process (torchrun's OMP_NUM_THREADS=1); ``extra_env`` is added to the environment, from which any
    inherited WORLD_SIZE / RANK / LOCAL_RANK / FASTDD_KILL_AT not in it is removed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **(extra_env or {}))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "FASTDD_KILL_AT"):
        if not extra_env or name not in extra_env:
            env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_compiled_matches_eager(f, x: torch.Tensor) -> None:
    """``torch.compile(f, fullgraph=True)`` (inductor) gives eager's value of the 0-d ``f(x)`` and its gradient with
    respect to x (dynamo reset first; two fresh leaves with x's layout)."""
    torch._dynamo.reset()
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    le = f(xe)
    lc = torch.compile(f, fullgraph=True)(xc)
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(torch.autograd.grad(lc, xc)[0], torch.autograd.grad(le, xe)[0])
