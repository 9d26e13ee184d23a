"""SRe2L's "relabel" step (FKD-style region soft labels), stored compactly and replayed exactly.

Spec ``lowrank_dwa_theory.md`` §2.1 "Relabel" / "Evaluate / post-train", §2.4. For every epoch e and every
batch of the distilled set, :func:`relabel_set` draws (from an explicit generator, never the global RNG)
the batch order, one crop box and flip per image, the batch's mix (CutMix or MixUp: partner permutation,
ratio, box), applies them (:func:`replay_batch`) and stores the frozen teacher's logits on the mixed batch.
A student then trains on :class:`ReplayDataset` / :class:`ReplaySampler` (a plain ``Dataset`` and
``Sampler``, one item = one stored batch), which re-applies the stored draws to the set's images and
returns the stored soft labels: the images are bit-identical to those the teacher saw (the same function
on the same stored values) and the teacher is never queried.

Layout of a relabel directory (default ``DIR/relabel``)::

    relabel.json             config, set / teacher fingerprints, shapes, storage report
    epoch_0000.safetensors   one file per epoch, written atomically (temporary file, fsync, rename);
    epoch_0001.safetensors   a killed relabel resumes at the first missing epoch (``--resume``)

Tensors of one epoch file (N images, B batch size, nb = ceil(N / B) batches, K classes, k = ``topk``;
"idx" is int16 when the largest value fits, else int32):

    order         idx [N]         the epoch's permutation of the set; batch j = order[j*B:(j+1)*B]
    boxes         int16 [N, 4]    per position of ``order``: crop box (top, left, h, w) in the image
                                  zero-padded by ``padding`` px per side, resized (bilinear) to (H, W)
                                  when (h, w) != (H, W)
    flips         uint8 [N]       1: horizontal flip after the crop
    mix_perm      idx [N]         per position: its mix partner's position inside the same batch
    mix_lam       float32 [nb]    per batch: the MixUp ratio, or CutMix's area-adjusted ratio (1: no mix)
    mix_box       int16 [nb, 4]   per batch: the CutMix box (top, left, h, w), zeros for MixUp
    logits        float16 [N, K]  (topk = 0) the teacher's logits on the mixed batch
    topk_values   float16 [N, k]  (topk > 0) the k largest logits,
    topk_indices  idx [N, k]      their classes,
    rest_logit    float16 [N]     and one logit r shared by the K - k other classes (the fold below)

Top-k fold: with the full fp32 logits z, fold temperature T0 (``fold_temperature``), the top-k set S and
the rest R (K - k classes), ``r = T0 * (logsumexp_{j in R}(z_j / T0) - log(K - k))``. Decoding sets
z_i for i in S and r for every j in R, so ``softmax(z_decoded / T0)`` keeps the top-k probabilities of
the full softmax and spreads the remaining mass ``1 - sum_S p_i`` uniformly over R (it sums to 1, being
a softmax); at a student temperature T != T0 the rest is an approximation.

Draws of epoch e, all from ``Generator().manual_seed(seed * 1_000_003 + e)`` (epochs are independent,
so resuming needs no generator state): ``randperm(N)``; the crops (``rrc``: :func:`fastdd.crops.rrc_boxes`;
``pad``: N row then N column offsets in {0..2 padding}); N flip coins; nb Beta(alpha, alpha) ratios
(:func:`fastdd.crops.beta_draws`); one ``randperm(b_j)`` per batch; for CutMix nb box-centre rows then nb
columns (the box of side ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))`` around the centre, clipped;
the stored ratio is then ``1 - box area / (H W)``).

Reference format (SRe2L ``relabel``, spec §2.1): one ``torch.save`` file per (epoch, batch) holding
[coords float32 [B, 4], flips bool [B], mix index int64 [B], lambda, bbox (4 ints), soft labels fp16
[B, K]]: 2K + 25 bytes per image and epoch plus a zip container per batch file;
:func:`reference_batch_bytes` measures that container exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .allocator import reuse_freed_memory
from .checkpoint import atomic_write, clean_stale_tmp
from .crops import beta_draws, rrc_boxes

META_FILE = "relabel.json"
FORMAT = "fastdd-relabel-1"
CROPS = ("pad", "rrc", "none")
MIXES = ("mixup", "cutmix", "none")
PRESET_NAMES = ("auto", "cifar", "tiny", "imagenet")

#: the post-training recipes of spec §2.1 / §2.4: crop, mix, batch, epochs and the KD temperature
RELABEL_PRESETS = {
    # SRe2L relabel_cifar.py / DWA validation_cifar.py: RandomCrop(32, 4) + flip, MixUp 0.8, batch 128, 400 ep, T 30
    "cifar": dict(epochs=400, batch_size=128, crop="pad", padding=4, mix="mixup", mix_alpha=0.8, fold_temperature=30.0),
    # DWA validation_tiny.py: RRC + flip, CutMix 1.0, batch 64, 200 epochs, T 20 (that recipe also uses T^2)
    "tiny": dict(epochs=200, batch_size=64, crop="rrc", padding=0, mix="cutmix", mix_alpha=1.0, fold_temperature=20.0),
    # SRe2L relabel.sh / train_FKD.sh: RRC(0.08-1) + flip, CutMix 1.0, batch 1024, 300 epochs, T 20
    "imagenet": dict(epochs=300, batch_size=1024, crop="rrc", padding=0, mix="cutmix", mix_alpha=1.0,
                     fold_temperature=20.0),
}


@dataclass
class RelabelConfig:
    """Relabel options; ``None`` fields come from the preset (module docstring, :data:`RELABEL_PRESETS`)."""

    preset: str = "auto"  # auto | cifar | tiny | imagenet (auto: tiny for tiny-imagenet, imagenet from 128 px)
    epochs: Optional[int] = None  # epochs of soft labels to store (a student may use fewer, not more)
    batch_size: Optional[int] = None  # images per stored batch (the student trains with exactly these batches)
    seed: int = 42  # epoch e draws from Generator().manual_seed(seed * 1_000_003 + e) (FKD's seed is 42)
    topk: int = 0  # store only the k largest logits per image and fold the rest (0: all K logits in fp16)
    fold_temperature: Optional[float] = None  # T0 of the top-k fold (the recipe's KD temperature)
    crop: Optional[str] = None  # pad (RandomCrop with zero padding) | rrc (RandomResizedCrop) | none
    padding: Optional[int] = None  # pad crop: pixels of zero padding per side
    min_scale: float = 0.08  # rrc: smallest crop area fraction
    flip: bool = True  # random horizontal flip (p 0.5) after the crop
    mix: Optional[str] = None  # mixup | cutmix | none
    mix_alpha: Optional[float] = None  # Beta(alpha, alpha) of the mix ratio

    def resolved(self, dataset_name: str, image_size) -> RelabelConfig:
        """A copy with every ``None`` field taken from the preset (``auto``: by dataset name and image size)."""
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"preset: expected one of {list(PRESET_NAMES)}, got {self.preset!r}")
        name = self.preset
        if name == "auto":
            name = "tiny" if "tiny" in dataset_name.lower() else "imagenet" if min(image_size) >= 128 else "cifar"
        fill = {k: v for k, v in RELABEL_PRESETS[name].items() if getattr(self, k) is None}
        out = dataclasses.replace(self, preset=name, **fill)
        out.validate()
        return out

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"topk: must be an int >= 0, got {self.topk!r}")
        if self.crop is not None and self.crop not in CROPS:
            raise ValueError(f"crop: expected one of {list(CROPS)}, got {self.crop!r}")
        if self.mix is not None and self.mix not in MIXES:
            raise ValueError(f"mix: expected one of {list(MIXES)}, got {self.mix!r}")
        if self.padding is not None and (not isinstance(self.padding, int) or self.padding < 0):
            raise ValueError(f"padding: must be an int >= 0, got {self.padding!r}")
        if self.mix_alpha is not None and not self.mix_alpha > 0:
            raise ValueError(f"mix_alpha: must be > 0, got {self.mix_alpha}")
        if self.fold_temperature is not None and not self.fold_temperature > 0:
            raise ValueError(f"fold_temperature: must be > 0, got {self.fold_temperature}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale: must lie in (0, 1], got {self.min_scale}")


# ------------------------------------------------------------------------------------------------ helpers
def _index_dtype(largest: int) -> torch.dtype:
    return torch.int16 if largest <= torch.iinfo(torch.int16).max else torch.int32


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch`` (module docstring)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2 ** 63))


def set_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) over the shape, the labels and a strided sample of the pixels of a set."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    h.update(labels.detach().cpu().to(torch.int64).numpy().tobytes())
    flat = images.detach().reshape(-1)
    h.update(flat[::max(1, flat.numel() // 65536)].cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_fingerprint(net: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) over the names, shapes and values of a network's state dict."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def epoch_file(directory, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.safetensors"


# ------------------------------------------------------------------------------------------------ draws
def draw_epoch(n: int, image_size: Tuple[int, int], cfg: RelabelConfig, epoch: int) -> Dict[str, torch.Tensor]:
    """The augmentation record of one epoch (CPU tensors, the epoch file's layout without the labels) for a
    set of ``n`` images of ``image_size = (H, W)``; ``cfg`` must be resolved."""
    g = epoch_generator(cfg.seed, epoch)
    height, width = image_size
    idx = _index_dtype(max(n, cfg.batch_size))
    order = torch.randperm(n, generator=g)
    if cfg.crop == "rrc":  # on the padded image (padding is 0 in the presets that use it)
        boxes = rrc_boxes(n, height + 2 * cfg.padding, width + 2 * cfg.padding, g, (cfg.min_scale, 1.0))
    elif cfg.crop == "pad":
        dy = torch.randint(0, 2 * cfg.padding + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * cfg.padding + 1, (n,), generator=g)
        boxes = torch.stack([dy, dx, torch.full((n,), height), torch.full((n,), width)], dim=1)
    else:
        boxes = torch.tensor([[cfg.padding, cfg.padding, height, width]]).expand(n, 4)
    flips = torch.rand(n, generator=g) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
    nb = -(-n // cfg.batch_size)
    sizes = [min(cfg.batch_size, n - j * cfg.batch_size) for j in range(nb)]
    if cfg.mix == "none":
        lam = torch.ones(nb, dtype=torch.float64)
    else:
        lam = beta_draws(cfg.mix_alpha, nb, g)
    perm = torch.cat([torch.randperm(b, generator=g) for b in sizes])
    mix_box = torch.zeros(nb, 4, dtype=torch.long)
    if cfg.mix == "cutmix":
        cy = torch.randint(0, height, (nb,), generator=g)
        cx = torch.randint(0, width, (nb,), generator=g)
        cut = torch.sqrt(1.0 - lam)
        ch, cw = (height * cut).long(), (width * cut).long()  # int() of a positive float: floor
        y1, y2 = (cy - ch // 2).clamp(0, height), (cy + ch // 2).clamp(0, height)
        x1, x2 = (cx - cw // 2).clamp(0, width), (cx + cw // 2).clamp(0, width)
        mix_box = torch.stack([y1, x1, y2 - y1, x2 - x1], dim=1)
        lam = 1.0 - (mix_box[:, 2] * mix_box[:, 3]).double() / (height * width)
    return {"order": order.to(idx), "boxes": boxes.to(torch.int16).contiguous(), "flips": flips.to(torch.uint8),
            "mix_perm": perm.to(idx), "mix_lam": lam.float(), "mix_box": mix_box.to(torch.int16)}


def replay_batch(images: torch.Tensor, record: Dict[str, torch.Tensor], batch: int, batch_size: int,
                 padding: int, mix: str) -> torch.Tensor:
    """Batch ``batch`` of an epoch ``record`` (:func:`draw_epoch` / an epoch file) applied to the set's
    images [N, C, H, W]: crop + resize, flip, mix. Returns [b, C, H, W] on the images' device. Relabel and
    replay both call this, so they produce the same bits."""
    dev = images.device
    lo = batch * batch_size
    order = record["order"][lo:lo + batch_size].long().to(dev)
    boxes = record["boxes"][lo:lo + batch_size].long()
    flips = record["flips"][lo:lo + batch_size].bool().to(dev)
    perm = record["mix_perm"][lo:lo + batch_size].long().to(dev)
    x = images[order]
    b, _, height, width = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    if bool((boxes[:, 2] == height).all()) and bool((boxes[:, 3] == width).all()):
        rows = (boxes[:, 0:1] + torch.arange(height)).to(dev)  # [b, H]
        cols = (boxes[:, 1:2] + torch.arange(width)).to(dev)  # [b, W]
        x = x.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2).contiguous()
    else:
        crops = []
        for i, (top, left, h, w) in enumerate(boxes.tolist()):
            c = x[i:i + 1, :, top:top + h, left:left + w]
            if (h, w) != (height, width):
                c = F.interpolate(c, size=(height, width), mode="bilinear", align_corners=False,
                                  antialias=h > height or w > width)
            crops.append(c)
        x = torch.cat(crops)
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    if mix == "mixup":
        lam = record["mix_lam"][batch].to(dev)
        x = lam * x + (1 - lam) * x[perm]
    elif mix == "cutmix":
        top, left, h, w = record["mix_box"][batch].tolist()
        if h and w:
            x = x.clone()
            x[:, :, top:top + h, left:left + w] = x[perm][:, :, top:top + h, left:left + w]
    return x


# ------------------------------------------------------------------------------------------------ labels
def encode_logits(logits: torch.Tensor, topk: int, fold_temperature: float) -> Dict[str, torch.Tensor]:
    """Compact soft labels of logits [b, K] (fp32): ``{"logits": fp16 [b, K]}`` for ``topk`` 0 (or >= K),
    else ``{"topk_values": fp16 [b, k], "topk_indices": idx [b, k], "rest_logit": fp16 [b]}`` (the fold
    of the module docstring)."""
    logits = logits.detach().float()
    k_all = logits.shape[1]
    if topk == 0 or topk >= k_all:
        return {"logits": logits.half().cpu()}
    values, indices = logits.topk(topk, dim=1)
    rest = logits.scatter(1, indices, float("-inf"))
    t0 = float(fold_temperature)
    rest_logit = t0 * (torch.logsumexp(rest / t0, dim=1) - math.log(k_all - topk))
    return {"topk_values": values.half().cpu(), "topk_indices": indices.to(_index_dtype(k_all)).cpu(),
            "rest_logit": rest_logit.half().cpu()}


def decode_logits(stored: Dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Float32 logits [b, K] of :func:`encode_logits`' output (top-k: the rest classes get ``rest_logit``)."""
    if "logits" in stored:
        return stored["logits"].float()
    rest = stored["rest_logit"].float()
    out = rest[:, None].expand(rest.shape[0], num_classes).clone()
    return out.scatter(1, stored["topk_indices"].long(), stored["topk_values"].float())


LABEL_KEYS = ("logits", "topk_values", "topk_indices", "rest_logit")


# ------------------------------------------------------------------------------------------------ storage
def reference_batch_bytes(b: int, num_classes: int) -> int:
    """Bytes of one batch file in the reference's format (module docstring), measured with ``torch.save``."""
    buf = io.BytesIO()
    torch.save([torch.zeros(b, 4), torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.int64), 0.5,
                [0, 0, 1, 1], torch.zeros(b, num_classes, dtype=torch.float16)], buf)
    return buf.getbuffer().nbytes


def storage_report(n: int, num_classes: int, cfg: RelabelConfig, epoch_bytes: int) -> dict:
    """Bytes per image per epoch of this store (``epoch_bytes``: the size of one epoch file) against the
    reference format (one ``torch.save`` file per batch), for a set of ``n`` images."""
    nb = -(-n // cfg.batch_size)
    last = n - (nb - 1) * cfg.batch_size
    ref = (nb - 1) * reference_batch_bytes(cfg.batch_size, num_classes) + reference_batch_bytes(last, num_classes)
    k = num_classes if cfg.topk == 0 or cfg.topk >= num_classes else cfg.topk
    idx = _index_dtype(max(n, cfg.batch_size)).itemsize
    tensor_bytes = (2 * k + (0 if k == num_classes else _index_dtype(num_classes).itemsize * k + 2)  # labels
                    + 2 * idx + 8 + 1)  # order, mix_perm, box, flip
    return {
        "bytes_per_epoch": int(epoch_bytes),
        "bytes_per_image_per_epoch": epoch_bytes / n,
        "tensor_bytes_per_image_per_epoch": tensor_bytes + (4 + 8) * nb / n,
        "reference_bytes_per_epoch": int(ref),
        "reference_bytes_per_image_per_epoch": ref / n,
        "reference_tensor_bytes_per_image_per_epoch": 2 * num_classes + 16 + 1 + 8,
        "reference_files_per_epoch": nb,
        "ratio_reference_to_this": ref / max(1, epoch_bytes),
    }


def format_storage(report: dict, epochs: int) -> str:
    return (f"storage: {report['bytes_per_image_per_epoch']:.1f} B per image per epoch "
            f"({report['bytes_per_epoch'] * epochs / 2 ** 20:.2f} MiB for {epochs} epochs, one file per epoch); "
            f"the reference format (a torch.save file per batch, fp16 logits, float32 coords, int64 mix index) "
            f"needs {report['reference_bytes_per_image_per_epoch']:.1f} B "
            f"({report['ratio_reference_to_this']:.2f}x, {report['reference_files_per_epoch']} files per epoch)")


# ------------------------------------------------------------------------------------------------ relabel
@reuse_freed_memory()
def relabel_set(images: torch.Tensor, labels: torch.Tensor, teacher: torch.nn.Module, cfg: RelabelConfig,
                out_dir, *, teacher_spec: str = "", dataset: str = "", resume: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the soft labels of the set (images [N, C, H, W], labels [N]) under ``out_dir`` (module
    docstring); ``cfg`` must be resolved (:meth:`RelabelConfig.resolved`). The teacher (frozen, kept in
    eval mode) runs on the images' device. With ``resume`` the epochs already on disk are kept (the
    metadata must match: same set, teacher and options; ``epochs`` may grow). Returns the metadata."""
    out = Path(out_dir)
    n, c, height, width = images.shape
    teacher.eval()
    with torch.no_grad():
        num_classes = int(teacher(images[:1]).shape[1])
    meta = {
        "format": FORMAT, "config": dataclasses.asdict(cfg), "dataset": dataset, "num_images": n,
        "num_classes": num_classes, "image_shape": [c, height, width],
        "set_fingerprint": set_fingerprint(images, labels), "teacher": teacher_spec,
        "teacher_fingerprint": teacher_fingerprint(teacher),
    }
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    if resume and (out / META_FILE).exists():
        check_meta_for_resume(out / META_FILE, meta)
    write_meta(out, meta)
    done = []
    for epoch in range(cfg.epochs):
        path = epoch_file(out, epoch)
        if resume and path.exists() and _readable(path):
            done.append(path.stat().st_size)
            continue
        record = draw_epoch(n, (height, width), cfg, epoch)
        parts = []
        with torch.no_grad():
            for j in range(-(-n // cfg.batch_size)):
                x = replay_batch(images, record, j, cfg.batch_size, cfg.padding, cfg.mix)
                parts.append(encode_logits(teacher(x), cfg.topk, cfg.fold_temperature))
        record.update({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        _save_epoch(path, record)
        done.append(path.stat().st_size)
        if progress is not None:
            progress(f"relabel epoch {epoch + 1}/{cfg.epochs} -> {path.name}")
    meta["storage"] = storage_report(n, num_classes, cfg, max(done))
    meta["epochs_done"] = cfg.epochs
    write_meta(out, meta)
    return meta


def _save_epoch(path: Path, record: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in record.items()}, tmp,
                                             metadata={"format": FORMAT}))


def _readable(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {"order", "boxes", "flips", "mix_perm", "mix_lam", "mix_box"} <= set(fh.keys())
    except Exception:  # noqa: BLE001 - a damaged file is relabelled
        return False


def write_meta(out: Path, meta: dict) -> None:
    atomic_write(out / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def check_meta_for_resume(path: Path, mine: dict) -> None:
    """Refuse (ValueError naming the file) to resume a relabel of another set, teacher or options."""
    try:
        saved = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"--resume: {path} is damaged ({exc}); use --force") from exc
    for key in ("set_fingerprint", "teacher_fingerprint", "num_classes", "image_shape", "num_images"):
        if saved.get(key) != mine[key]:
            raise ValueError(f"--resume: {path} was made for another {key.split('_')[0]} ({key} "
                             f"{saved.get(key)!r}, this run has {mine[key]!r}); use another --out or --force")
    old, new = saved.get("config", {}), mine["config"]
    differ = sorted(k for k in new if k != "epochs" and old.get(k) != new[k])
    if differ:
        raise ValueError(f"--resume: {path} was written with " + ", ".join(
            f"{k}={old.get(k)!r}" for k in differ) + " (this run: " + ", ".join(
            f"{k}={new[k]!r}" for k in differ) + "); --resume needs the same options (or use --force)")


# ------------------------------------------------------------------------------------------------ replay
class RelabelStore:
    """A relabel directory opened for reading: ``meta`` (relabel.json), ``config`` (:class:`RelabelConfig`),
    ``epochs`` (consecutive epoch files present from 0), ``epoch(e)`` (its tensors, the last one cached)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        path = self.directory / META_FILE
        if not self.directory.is_dir():
            raise FileNotFoundError(f"soft_labels: {self.directory} is not a directory (run `fastdd relabel DIR` "
                                    "first)")
        if not path.is_file():
            raise FileNotFoundError(f"soft_labels: {self.directory} holds no {META_FILE}; not a relabel directory "
                                    "(run `fastdd relabel DIR --out ...`)")
        try:
            self.meta = json.loads(path.read_text())
            self.config = RelabelConfig(**self.meta["config"])
            self.num_images = int(self.meta["num_images"])
            self.num_classes = int(self.meta["num_classes"])
            self.image_shape = tuple(int(s) for s in self.meta["image_shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"soft_labels: {path} is damaged ({type(exc).__name__}: {exc})") from exc
        self.epochs = 0
        while epoch_file(self.directory, self.epochs).is_file():
            self.epochs += 1
        self.batches = -(-self.num_images // self.config.batch_size)
        self._cached: Tuple[int, Optional[dict]] = (-1, None)

    def epoch(self, e: int) -> Dict[str, torch.Tensor]:
        if self._cached[0] != e:
            from safetensors.torch import load_file

            path = epoch_file(self.directory, e)
            try:
                self._cached = (e, load_file(str(path)))
            except Exception as exc:  # noqa: BLE001 - one line naming the file
                raise ValueError(f"soft_labels: {path} is damaged or missing ({type(exc).__name__}); rerun "
                                 "`fastdd relabel --resume`") from exc
        return self._cached[1]

    def soft_logits(self, e: int, batch: int) -> torch.Tensor:
        """Float32 logits [b, K] of batch ``batch`` of epoch ``e``."""
        rec, b = self.epoch(e), self.config.batch_size
        return decode_logits({k: rec[k][batch * b:(batch + 1) * b] for k in LABEL_KEYS if k in rec}, self.num_classes)

    def check_for(self, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
                  teacher: Optional[torch.nn.Module] = None) -> None:
        """ValueError naming the argument when this store cannot train a student on ``images`` [N, C, H, W] /
        ``labels`` [N] for ``epochs`` epochs of ``batch_size``, or was made by another ``teacher``."""
        where = self.directory
        if tuple(images.shape[1:]) != self.image_shape or images.shape[0] != self.num_images:
            raise ValueError(f"soft_labels: {where} was made for {self.num_images} images of shape "
                             f"{list(self.image_shape)}, the set has {images.shape[0]} of {list(images.shape[1:])}")
        if set_fingerprint(images, labels) != self.meta.get("set_fingerprint"):
            raise ValueError(f"soft_labels: {where} was made for another set (fingerprint "
                             f"{self.meta.get('set_fingerprint')}, this set {set_fingerprint(images, labels)})")
        if epochs > self.epochs:
            raise ValueError(f"epochs: the student asks for {epochs} epochs, {where} stores {self.epochs}; run "
                             f"`fastdd relabel ... --epochs {epochs} --resume` or pass --epochs <= {self.epochs}")
        if batch_size != self.config.batch_size:
            raise ValueError(f"batch_size: the stored soft labels come in batches of {self.config.batch_size} "
                             f"(the student got {batch_size}); pass --batch-size {self.config.batch_size}")
        if teacher is not None and teacher_fingerprint(teacher) != self.meta.get("teacher_fingerprint"):
            raise ValueError(f"teacher: the soft labels in {where} were made by another teacher "
                             f"({self.meta.get('teacher') or '?'}, fingerprint {self.meta.get('teacher_fingerprint')}); "
                             "pass that teacher or relabel with this one")


class ReplayDataset(torch.utils.data.Dataset):
    """The stored epochs replayed on a set: item ``e * batches + j`` is batch j of epoch e as
    ``(images [b, C, H, W], soft logits float32 [b, K])`` (``with_labels=False``: ``(images, None)``, for a
    same-size set labelled online, e.g. the random baseline). Images: [N, C, H, W] on any device (keep them
    on the CPU with DataLoader workers). Use with :class:`ReplaySampler` and ``batch_size=None``."""

    def __init__(self, images: torch.Tensor, store: RelabelStore, with_labels: bool = True):
        if images.shape[0] != store.num_images:
            raise ValueError(f"images: {images.shape[0]} images, the store has {store.num_images}")
        self.images, self.store, self.with_labels = images, store, with_labels

    def __len__(self) -> int:
        return self.store.epochs * self.store.batches

    def __getitem__(self, item: int):
        e, j = divmod(int(item), self.store.batches)
        cfg = self.store.config
        x = replay_batch(self.images, self.store.epoch(e), j, cfg.batch_size, cfg.padding, cfg.mix)
        soft = self.store.soft_logits(e, j).to(x.device) if self.with_labels else None
        return x, soft


class ReplaySampler(torch.utils.data.Sampler):
    """The items of one epoch of a :class:`ReplayDataset`, in stored order; ``set_epoch(e)`` moves on."""

    def __init__(self, store: RelabelStore, epoch: int = 0):
        self.store, self.epoch = store, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        base = self.epoch * self.store.batches
        return iter(range(base, base + self.store.batches))

    def __len__(self) -> int:
        return self.store.batches


def replay_loader(images: torch.Tensor, store: RelabelStore, with_labels: bool = True, num_workers: int = 0):
    """``(DataLoader, ReplaySampler)`` over :class:`ReplayDataset` (one item per stored batch)."""
    sampler = ReplaySampler(store)
    loader = torch.utils.data.DataLoader(ReplayDataset(images, store, with_labels), sampler=sampler,
                                         batch_size=None, num_workers=num_workers,
                                         persistent_workers=num_workers > 0)
    return loader, sampler


def relabel_dirs_present(directory) -> bool:
    """Whether ``directory`` holds a relabel run (its metadata or any epoch file)."""
    d = Path(directory)
    return d.is_dir() and ((d / META_FILE).exists() or any(d.glob("epoch_*.safetensors")))


__all__ = ["RelabelConfig", "RELABEL_PRESETS", "RelabelStore", "ReplayDataset", "ReplaySampler", "relabel_set",
           "replay_batch", "draw_epoch", "encode_logits", "decode_logits", "storage_report", "replay_loader",
           "set_fingerprint", "teacher_fingerprint", "epoch_file", "META_FILE"]
