"""Distribution Matching (DM; Zhao & Bilen, WACV 2023), batched.

Per iteration (spec ``dm_dance.md`` §1.4–1.6):

1. draw ``batch_real`` real images of every class (one batched draw, class-major);
2. re-initialise the embedding network with fresh random weights (never trained);
3. draw one DSA transform per class and apply it identically to that class's real and synthetic images;
4. embed all real images in one no-grad forward and all synthetic images in one forward;
5. loss = sum_c || mean_real_c - mean_syn_c ||^2 over the flattened embeddings (per-class mean by a
   segmented reduction, :class:`fastdd.matchers.MMDMatcher`), one SGD step on the synthetic pixels.

The per-class loop of the reference (one forward per class and side) computes the same loss whenever
the network treats samples independently (instance norm, no norm); :func:`dm_loss_per_class` keeps that
formulation for tests and the benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compile import attach_embedder, cache_rows, check_compile_mode
from ..matchers import MMDMatcher
from ..models import embed_with_taps, init_parameters
from .base import Method, MethodConfig
from .registry import register


@dataclass
class DMConfig(MethodConfig):
    """DM options; the defaults are the reference's (20k iterations, 256 real/class, lr 1, momentum 0.5)."""

    iterations: int = 20000
    real_chunk: int = -1  # rows per no-grad real forward; -1: automatic (default_real_chunk); 0: all at once
    compile: str = "auto"  # torch.compile of the embedding: "auto" | "on" | "off" (fastdd.compile)
    real_dtype: str = "float32"  # no-grad real side: "float32" | "bfloat16" (autocast; opt-in, see README)


REAL_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def default_real_chunk(device: torch.device, net=None) -> int:
    """Rows per no-grad real forward: everything at once on a GPU; on a CPU the rows whose largest
    activation map (``net``'s first block: width x H x W fp32 per row; 128 x 32 x 32 for ConvNet-3)
    takes about twice the last-level cache, between 32 and 512 rows (128 on a 32 MiB L3 at CIFAR shape:
    measured the fastest of 64 / 128 / 256 / 512 on an EPYC, eager and compiled)."""
    if torch.device(device).type == "cuda":
        return 0
    per_row = 128 * 32 * 32 * 4
    if net is not None and hasattr(net, "width") and hasattr(net, "im_size"):
        pad = getattr(net, "first_padding", 1)
        per_row = net.width * (net.im_size[0] + 2 * pad - 2) * (net.im_size[1] + 2 * pad - 2) * 4
    return cache_rows(per_row)


def equal_chunks(n: int, target: int) -> int:
    """Chunk length for ``n`` rows near ``target``: the largest divisor of ``n`` not above ``target`` (so
    every chunk has one shape and a compiled graph serves all), or ``target`` when that divisor is below
    ``target / 2`` (the last chunk is then shorter)."""
    if target <= 0 or n <= target:
        return n
    best = max(d for d in range(1, target + 1) if n % d == 0)
    return best if 2 * best >= target else target


def embed_pairs(net, dsa, draw, real, real_labels, syn, syn_labels, real_chunk: int = 0, taps: bool = False,
                real_dtype: str = "float32"):
    """Augment both sides with the per-class ``draw`` and embed them.

    The real side runs without autograd, in class-agnostic chunks of about ``real_chunk`` rows (0: one
    forward; see :func:`equal_chunks`); instance norm is per sample, so chunking does not change the
    result. ``real_dtype="bfloat16"`` runs the real side under bf16 autocast (features returned in fp32).
    The network runs through its :class:`fastdd.compile.Embedder` when one is attached
    (:func:`fastdd.compile.attach_embedder`: compiled and/or channels_last), else eagerly.
    Returns (real features [K*n, F] without autograd graph, synthetic features [K*IPC, F]); with
    ``taps=True`` (real features, real taps, synthetic features, synthetic taps), the taps being the
    per-block maps of :func:`fastdd.models.embed_with_taps`.
    """
    from ..compile import embedder_for

    if real_dtype not in REAL_DTYPES:
        raise ValueError(f"real_dtype: expected one of {sorted(REAL_DTYPES)}, got {real_dtype!r}")
    runner = embedder_for(net)
    if runner is None:
        embed = (lambda x: embed_with_taps(net, x)) if taps else net.embed
    else:
        embed = runner.embed_with_taps if taps else runner.embed
    low = REAL_DTYPES[real_dtype]
    with torch.no_grad():
        if dsa is not None:
            real = dsa.apply(real, draw, real_labels)
        with torch.autocast(real.device.type, dtype=low, enabled=low is not None):
            if real_chunk and real.shape[0] > real_chunk:
                parts = [embed(part) for part in real.split(equal_chunks(real.shape[0], real_chunk))]
                if taps:
                    real_out = (torch.cat([p[0] for p in parts]),
                                [torch.cat([p[1][l] for p in parts]) for l in range(len(parts[0][1]))])
                else:
                    real_out = torch.cat(parts)
            else:
                real_out = embed(real)
        if low is not None:
            real_out = (real_out[0].float(), [t.float() for t in real_out[1]]) if taps else real_out.float()
    if dsa is not None:
        syn = dsa.apply(syn, draw, syn_labels)
    syn_out = embed(syn)
    if taps:
        return real_out[0], real_out[1], syn_out[0], syn_out[1]
    return real_out, syn_out


def dm_loss_batched(net, dsa, draw, real, real_labels, syn, syn_labels, num_classes, matcher=None,
                    real_chunk: int = 0, real_dtype: str = "float32"):
    """DM loss with all classes in one forward per side. Shapes: real [K*n, C, H, W], syn [K*IPC, C, H, W]."""
    matcher = matcher or MMDMatcher()
    real_feat, syn_feat = embed_pairs(net, dsa, draw, real, real_labels, syn, syn_labels, real_chunk,
                                      real_dtype=real_dtype)
    return matcher(real_feat, real_labels, syn_feat, syn_labels, num_classes)


def dm_loss_per_class(net, dsa, draw, real, real_labels, syn, syn_labels, num_classes):
    """The reference formulation: a Python loop over classes, one forward per class and side."""
    loss = syn.new_zeros(())
    for c in range(num_classes):
        r = real[real_labels == c]
        s = syn[syn_labels == c]
        if dsa is not None:
            with torch.no_grad():
                r = dsa.apply(r, draw, torch.full((r.shape[0],), c, device=r.device, dtype=torch.long))
            s = dsa.apply(s, draw, torch.full((s.shape[0],), c, device=s.device, dtype=torch.long))
        with torch.no_grad():
            mean_real = net.embed(r).mean(0)
        mean_syn = net.embed(s).mean(0)
        loss = loss + ((mean_real - mean_syn) ** 2).sum()
    return loss


@register("dm")
class DM(Method):
    """Distribution Matching with batched classes (see module docstring)."""

    config_cls = DMConfig

    def __init__(self, config: DMConfig, dataset, device="cpu"):
        super().__init__(config, dataset, device)
        self.net = self._network()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.dsa = self._augmentation()
        self.matcher = MMDMatcher(validate=False)  # labels checked once when the method is built
        self.real_chunk = default_real_chunk(self.device, self.net) if config.real_chunk < 0 else config.real_chunk
        check_compile_mode(config.compile)
        if config.real_dtype not in REAL_DTYPES:
            raise ValueError(f"real_dtype: expected one of {sorted(REAL_DTYPES)}, got {config.real_dtype!r}")
        attach_embedder(self.net, config.compile, self.device, calls=config.iterations)

    def draw(self):
        """The iteration's random draws, eagerly and in the reference order from the run's generator:
        (real [K*batch_real, C, H, W], real_labels [K*batch_real], DSA draw or None); also re-initialises
        the embedding network."""
        real, real_labels = self.sampler.sample(self.config.batch_real, self.generator)
        init_parameters(self.net, self.generator)
        draw = None
        if self.dsa is not None:
            draw = self.dsa.draw(self.num_classes, self.generator, self.dataset.image_size)
        return real, real_labels, draw

    def loss(self, real, real_labels, syn, draw) -> torch.Tensor:
        """The iteration's loss (0-d) from tensors only: no random draw and no host sync, so it compiles
        with ``torch.compile(fullgraph=True)``. syn: the synthetic images [K*n, C, H, W]."""
        if self.addons:
            taps = self.needs_taps
            out = embed_pairs(self.net, self.dsa, draw, real, real_labels, syn, self.labels,
                              self.real_chunk, taps=taps, real_dtype=self.config.real_dtype)
            real_feat, real_taps, syn_feat, syn_taps = out if taps else (out[0], None, out[1], None)
            loss = self.matcher(real_feat, real_labels, syn_feat, self.labels, self.num_classes)
            return loss + self.addon_loss(real_feat, real_taps, real_labels, syn_feat, syn_taps, self.labels)
        return dm_loss_batched(self.net, self.dsa, draw, real, real_labels, syn, self.labels,
                               self.num_classes, self.matcher, self.real_chunk, self.config.real_dtype)

    def step(self) -> float:
        real, real_labels, draw = self.draw()
        return self.update(self.loss(real, real_labels, self.images, draw))
