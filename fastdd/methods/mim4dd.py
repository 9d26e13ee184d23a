"""MIM4DD (Shang et al., NeurIPS 2023): mutual-information add-on ("mim") and the ``mim4dd`` method (DM + it).

What is verified (spec ``ddm_mim4dd.md`` §2.2): MIM4DD is an *add-on* to a DD method; it maximises the
mutual information between synthetic and real data through a contrastive (NCE) objective in which a real
and a synthetic sample with the same label form a positive pair and different labels a negative pair,
per layer, on representations embedded into a contrastive space. No official code is public: every
detail below is **unverified for MIM4DD** and is a switch (a ``MethodConfig`` field, i.e. a CLI flag);
the defaults follow CRD / CMIM (the first author's earlier code for the same formulation, §2.3).

Per iteration, with the base method's real and synthetic features (the same frozen random network on
both sides for DM / DDM / DANCE; MIM4DD's two-network framing would need a trained real-side network):

    for each layer l:  a_r = pool(real tap l) [Nr, C_l],  a_s = pool(syn tap l) [Ns, C_l]
                       z_r = head_r_l(a_r), z_s = head_s_l(a_s)                 [N, mim_dim]
                       L_l = InfoNCEMatcher(z_s, y_s, z_r, y_r)   (rows L2-normalised inside the matcher)
    loss = mim_weight * sum_l L_l     (``mim_layer_reduction="mean"``: divided by the number of layers)

The heads are trained jointly with the images, minimising the same loss (maximising the MI bound), by
their own optimiser (SGD, lr ``mim_lr``, momentum 0.9, as CRD's embedding heads), stepped after the image
step. Their initialisation (PyTorch's default Linear scheme) is drawn from a generator derived from the
run's seed (not the run's generator, so the base method's random stream is the same with or without the
add-on) when the add-on is built; heads, optimiser state and all draws round-trip through ``state_dict`` for exact resume.

Switches and their defaults (all [UNVERIFIED for MIM4DD], spec §2.3 / §2.4):

* ``mim_weight`` (lambda): 0 = add-on off; the ``mim4dd`` method defaults to 1.0.
* ``mim_form``: ``"supcon"`` (multi-positive InfoNCE, label-defined positives) | ``"nce"`` (CRD/CMIM binary
  critic ``h = e^{s/tau} / (e^{s/tau} + N/M)`` with in-batch negatives; no memory bank).
* ``mim_temperature`` tau = 0.1 (CMIM); ``mim_dim`` d = 128 (CMIM); ``mim_symmetric``: also use real
  anchors (the matcher's ``symmetric``; CRD/CMIM use both directions) - off by default.
* ``mim_layers``: ``"all"`` (every conv block's tap; "pairs of representations for each layer") |
  ``"last"`` (the final embedding only, as CMIM's code does).
* ``mim_pool``: ``"mean"`` (global average pool of each tap before the head). Flattening the taps is not
  offered: at 32x32 the first block's tap has 128*32*32 = 131,072 dims, i.e. a 16.8 M-parameter head per
  layer and side whose GEMM would dominate the iteration (spec §2.6). ``"last"`` uses the (already flat)
  embedding as is.
* ``mim_head``: ``"linear"`` (one learned linear head per layer and side, CRD/CMIM) | ``"none"`` (the pooled
  features themselves, normalised; no parameters).
* ``mim_shared_head``: one head per layer for both sides (the base methods use one network for both
  sides) instead of CRD's separate real / synthetic heads (default off).
* ``mim_layer_reduction``: ``"sum"`` over layers (MI summed across layers, the caption's Eq. 2.9) | ``"mean"``.
* The real side is the base method's frozen random network, not a network trained on real data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..matchers import InfoNCEMatcher
from ..models import init_parameters
from ..plugins.mim_config import FORMS, HEADS, LAYER_REDUCTIONS, LAYERS, POOLS, validate_mim_config  # noqa: F401  (re-exported)
from .addons import register_addon
from .dm import DM, DMConfig
from .registry import register

HEAD_SEED_TAG = 0x4D494D  # 'MIM': second entropy word of the heads' SeedSequence
HEAD_MOMENTUM = 0.9


def _feature_dims(method) -> list:
    """Input width of each head: the taps' channel counts ("all") or the embedding width ("last"), found by
    one forward of a zero image through a throw-away copy of the model (no draw from the run's generator)."""
    from ..models import embed_with_taps, get_model

    ds = method.dataset
    net = get_model(method.config.model, ds.channels, method.num_classes, ds.image_size,
                    generator=torch.Generator().manual_seed(0))
    x = torch.zeros(1, ds.channels, *ds.image_size)
    with torch.no_grad():
        if method.config.mim_layers == "last":
            return [net.embed(x).shape[1]]
        _, taps = embed_with_taps(net, x)
    return [t.shape[1] for t in taps]


def pool_features(emb: torch.Tensor, taps, layers: str) -> list:
    """The per-layer features the heads see: [emb] ("last") or the global average pools of the taps
    ([N, C_l] each, "all")."""
    if layers == "last":
        return [emb]
    return [t.mean(dim=(2, 3)) for t in taps]


class MIMAddon:
    """The "mim" add-on (contract of :mod:`fastdd.methods.addons`; see the module docstring)."""

    def __init__(self, method):
        cfg = method.config
        self.config = cfg
        self.needs_taps = cfg.mim_layers == "all"
        self.weight = float(cfg.mim_weight)
        self.matcher = InfoNCEMatcher(temperature=cfg.mim_temperature, form=cfg.mim_form, normalize=True,
                                      symmetric=cfg.mim_symmetric, validate=False)
        dims = _feature_dims(method)
        self.heads = nn.ModuleDict()
        if cfg.mim_head == "linear":
            sides = ("shared",) if cfg.mim_shared_head else ("real", "syn")
            for side in sides:
                self.heads[side] = nn.ModuleList(nn.Linear(d, cfg.mim_dim) for d in dims)
            self.heads.to(method.device)
            # a generator of their own, derived from the run's seed: switching the add-on on does not shift
            # the base method's random stream (real batches, networks, augmentation), so runs stay paired
            head_gen = torch.Generator(device=method.device).manual_seed(
                int(np.random.SeedSequence((int(cfg.seed), HEAD_SEED_TAG)).generate_state(1)[0]))
            with torch.no_grad():
                init_parameters(self.heads, head_gen)
        params = list(self.heads.parameters())
        self.optimizer = torch.optim.SGD(params, lr=cfg.mim_lr, momentum=HEAD_MOMENTUM) if params else None

    def _head(self, side: str, layer: int):
        if not len(self.heads):
            return None
        return self.heads["shared" if "shared" in self.heads else side][layer]

    def loss(self, real_emb, real_taps, real_labels, syn_emb, syn_taps, syn_labels) -> torch.Tensor:
        layers = self.config.mim_layers
        if layers == "all" and (real_taps is None or syn_taps is None):
            raise ValueError("mim add-on: mim_layers='all' needs the feature taps, but the method passed none")
        real = pool_features(real_emb, real_taps, layers)
        syn = pool_features(syn_emb, syn_taps, layers)
        total = None
        for l, (a_r, a_s) in enumerate(zip(real, syn)):
            hr, hs = self._head("real", l), self._head("syn", l)
            z_r = a_r.detach() if hr is None else hr(a_r.detach().to(hr.weight.dtype))
            z_s = a_s if hs is None else hs(a_s.to(hs.weight.dtype))
            term = self.matcher(z_s, syn_labels, z_r, real_labels)
            total = term if total is None else total + term
        if self.config.mim_layer_reduction == "mean":
            total = total / len(real)
        return self.weight * total

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"heads": {k: v.detach().cpu().clone() for k, v in self.heads.state_dict().items()},
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        device = next(self.heads.parameters()).device if len(self.heads) else None
        self.heads.load_state_dict({k: v.to(device) for k, v in state["heads"].items()})
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


register_addon("mim", lambda config: getattr(config, "mim_weight", 0.0) > 0, MIMAddon)


@dataclass
class MIM4DDConfig(DMConfig):
    """DM with the MIM4DD add-on switched on (``mim_weight`` 1.0, unverified; see the module docstring)."""

    mim_weight: float = 1.0


@register("mim4dd")
class MIM4DD(DM):
    """DM + the "mim" add-on (the add-on does the work through DM's add-on hooks)."""

    config_cls = MIM4DDConfig
