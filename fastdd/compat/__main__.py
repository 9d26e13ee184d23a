"""``python -m fastdd.compat SCRIPT.py [ARGS...]``: run an unmodified reference-style script with its
``import utils`` / ``import networks`` (and ``from utils import ...``) resolved to :mod:`fastdd.compat`."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import types
from typing import List, Optional

HELP = """Run SCRIPT.py (written against VICO-UoE/DatasetCondensation's utils.py / networks.py) with
`utils` and `networks` resolved to fastdd.compat.utils / fastdd.compat.networks. Where torchvision
cannot be imported, a minimal stand-in module `torchvision.utils` with `save_image(tensor, fp, nrow=8,
padding=2, normalize=False, value_range=None)` is installed; it writes PNG grids with Pillow. Nothing
else of torchvision is provided."""


def _save_image(tensor, fp, nrow: int = 8, padding: int = 2, normalize: bool = False, value_range=None, **_):
    """Write ``tensor`` [N, C, H, W] (or [C, H, W]) as a PNG grid of ``nrow`` images per row (Pillow).
    Values are clamped to [0, 1] (after min-max scaling with ``normalize``)."""
    import numpy as np
    import torch
    from PIL import Image

    x = tensor.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if normalize:
        lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
        x = (x - lo) / max(hi - lo, 1e-12)
    x = x.clamp(0, 1)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr).save(fp, format="PNG")


def install_modules() -> None:
    """Alias ``utils`` / ``networks`` to fastdd.compat's; add the torchvision stand-in if needed."""
    from . import networks, utils

    sys.modules["utils"] = utils
    sys.modules["networks"] = networks
    try:
        import torchvision.utils  # noqa: F401
    except Exception:  # torchvision missing or broken (it often fails on mismatched torch builds)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv = types.ModuleType("torchvision")
        tv_utils = types.ModuleType("torchvision.utils")
        tv_utils.save_image = _save_image
        tv.utils = tv_utils
        tv.__fastdd_stub__ = True
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.utils"] = tv_utils


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdd.compat", description=HELP)
    parser.add_argument("script", help="the reference-style script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, passed unchanged")
    ns = parser.parse_args(argv)
    if not os.path.isfile(ns.script):
        parser.error(f"script: no such file {ns.script!r}")
    install_modules()
    sys.argv = [ns.script, *ns.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
    runpy.run_path(ns.script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
