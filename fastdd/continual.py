"""Class-incremental continual learning with distilled memories (spec ``lowrank_dwa_theory.md`` 1.6).

Protocol (DM's CL setup, also used by the low-rank plugin paper; reference ``CL_DM.py``):

- A class order is a random permutation of the K classes, one per order seed s (default s = 0..4). With
  ``order_source="numpy"`` (default) it is ``numpy.random.RandomState(s).permutation(K)`` -- the same
  orders as the reference's ``np.random.seed(s); np.random.permutation(K)``, drawn from an explicit
  generator instead of the global one; ``"torch"`` uses ``torch.randperm(K, generator=Generator(s))``.
- The order is split into ``K / classes_per_step`` equal steps (Fashion-MNIST/CIFAR-10: 5 steps of 2).
- Step t brings a new chunk of classes. Their set is distilled by the chosen method from the training
  images of *those classes only* (:func:`restrict_classes`: the subset relabelled 0..k-1 in order-chunk
  order; the distilled labels are mapped back to the global class ids). **Unverified**: the reference
  loads these per-step sets from files made by a script that is not published; distilling each step
  from its own classes only is the reading that matches a class-incremental setting (no access to
  future or past raw data), and it is what this module does.
- The memory at step t is the union of the per-step sets of steps 0..t (labels global, class-major by
  step). A fresh network (``EvalConfig.model``, K output logits as in the reference) is trained from
  scratch on the memory with the evaluation protocol of ``EvalConfig.protocol`` (:func:`fastdd.evaluate.
  train_stacked`; default ``dm``: SGD lr 0.01, momentum 0.9, wd 5e-4, batch 256, DSA on every mini-batch,
  lr x0.1 at half the epochs; ``idc``: IDC's loop, the last epoch's accuracy is reported; ``kd`` needs a
  teacher and is refused) and tested on the test images of all seen classes. ``EvalConfig.num_models`` models per order and step
  (reference: 3); the report gives mean +- std per step over orders x models (reference: 15 values).
- Random-buffer baseline: per step, ``ipc`` random real training images of each new class (the
  reference's "random" method), trained and tested identically. The baseline models start from the same
  initialisations as the method's models (paired); the buffer is drawn and trained from its own seeds,
  so every method run with the same seeds is compared with the very same buffer accuracies. ``ipc`` is the storage budget: for a plain method the
  buffer holds exactly as many images per class as the distilled memory; for the low-rank plugin
  (``rank`` > 0) the distilled memory holds ``lowrank_ipc(ipc, H, W, r)`` rank-r images per class in the
  storage of ``ipc`` plain images, and the buffer keeps ``ipc`` real images per class (same floats
  stored; the reference's CL comparison of DM 10 IPC vs LoDM 80 IPC). ``buffer_source="init"`` uses the
  real images a real-initialised set started from instead (paired subsets, lower variance).

Everything random is drawn from explicit generators seeded from ``(seed, order seed, step)`` through
``numpy.random.SeedSequence``, so a run is reproducible and each (order, step) is independent of how
many orders or steps are run. Method-agnostic: any registered method (``fastdd.methods.get(name)``) with
its config instance (whose ``seed`` is replaced per order and step).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .data import ClassSampler, ImageDataset
from .evaluate import EvalConfig, train_stacked
from .synset import stored_floats, synset_images
from .validation import check_positive_int


# ----------------------------------------------------------------------------------------- orders
def class_orders(num_classes: int, seeds: Sequence[int], source: str = "numpy") -> List[List[int]]:
    """One class order (a permutation of ``range(num_classes)``) per seed; see the module docstring."""
    check_positive_int("num_classes", num_classes)
    if source not in ("numpy", "torch"):
        raise ValueError(f"order_source: expected 'numpy' or 'torch', got {source!r}")
    orders = []
    for s in seeds:
        s = int(s)
        if s < 0:
            raise ValueError(f"order seed: must be >= 0, got {s}")
        if source == "numpy":
            orders.append([int(c) for c in np.random.RandomState(s).permutation(num_classes)])
        else:
            orders.append(torch.randperm(num_classes, generator=torch.Generator().manual_seed(s)).tolist())
    return orders


def split_steps(order: Sequence[int], classes_per_step: int) -> List[List[int]]:
    """Split a class order into equal consecutive chunks of ``classes_per_step`` classes."""
    check_positive_int("classes_per_step", classes_per_step)
    order = [int(c) for c in order]
    if len(order) % classes_per_step:
        raise ValueError(f"classes_per_step: {len(order)} classes cannot be split into equal steps of "
                         f"{classes_per_step}")
    return [order[i:i + classes_per_step] for i in range(0, len(order), classes_per_step)]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed for one (run seed, order seed, step, stream) tuple (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------- data
def restrict_classes(dataset: ImageDataset, classes: Sequence[int]) -> ImageDataset:
    """The images of ``classes`` only, relabelled ``classes[i] -> i`` (num_classes = len(classes)).

    Map labels back with ``torch.tensor(classes)[local_labels]``. Raises on unknown, repeated or empty
    classes.
    """
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes: is empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes: has repeated entries {classes}")
    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(f"classes: {bad} not in [0, {dataset.num_classes}) of {dataset.name}")
    lookup = torch.full((dataset.num_classes,), -1, dtype=torch.long, device=dataset.labels.device)
    lookup[torch.tensor(classes, device=lookup.device)] = torch.arange(len(classes), device=lookup.device)
    local = lookup[dataset.labels]
    keep = torch.nonzero(local >= 0).flatten()
    counts = torch.bincount(local[keep], minlength=len(classes))
    if int(counts.min()) == 0:
        raise ValueError(f"classes: class {classes[int(counts.argmin())]} has no images in {dataset.name} "
                         f"({dataset.split})")
    names = [dataset.class_names[c] for c in classes]
    return dataclasses.replace(dataset, images=dataset.images[keep], labels=local[keep],
                               num_classes=len(classes), class_names=names)


def select_classes(dataset: ImageDataset, classes: Sequence[int]) -> ImageDataset:
    """The images of ``classes`` only, keeping the global labels and ``num_classes`` (for testing)."""
    mask = torch.isin(dataset.labels, torch.tensor([int(c) for c in classes], device=dataset.labels.device))
    return dataclasses.replace(dataset, images=dataset.images[mask], labels=dataset.labels[mask])


@dataclass
class Memory:
    """A class-incremental memory: images [N, C, H, W] with global labels [N], built step by step."""

    images: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> Memory:
        """Append a step's set (images [n, C, H, W], global labels [n]); returns self."""
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"labels: {labels.shape[0]} labels for {images.shape[0]} images")
        images, labels = images.detach(), labels.detach().long()
        if self.images is None:
            self.images, self.labels = images, labels
        else:
            if self.images.shape[1:] != images.shape[1:]:
                raise ValueError(f"images: shape {tuple(images.shape[1:])} differs from the memory's "
                                 f"{tuple(self.images.shape[1:])}")
            if bool(torch.isin(labels, self.labels).any()):
                raise ValueError("labels: a step's classes are already in the memory (classes must be new)")
            self.images = torch.cat([self.images, images.to(self.images.device)])
            self.labels = torch.cat([self.labels, labels.to(self.labels.device)])
        return self

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=num_classes)


def random_buffer(train: ImageDataset, classes: Sequence[int], per_class: int, generator: torch.Generator):
    """``per_class`` random training images of each of ``classes``: (images, global labels), class-major."""
    sub = restrict_classes(train, classes)
    sampler = ClassSampler(sub.images, sub.labels, sub.num_classes)
    try:
        idx = sampler.sample_indices(per_class, generator).reshape(-1)
    except ValueError as exc:
        raise ValueError(f"ipc: {exc}") from None
    mapping = torch.tensor([int(c) for c in classes], device=sub.labels.device)
    return sub.images[idx], mapping[sub.labels[idx]]


# ----------------------------------------------------------------------------------------- config
@dataclass
class ContinualConfig:
    """Options of the class-incremental protocol (see the module docstring)."""

    classes_per_step: int = 2
    orders: int = 5  # order seeds 0..orders-1 unless order_seeds is given
    order_seeds: Optional[List[int]] = None
    order_source: str = "numpy"  # "numpy" (the reference's orders) or "torch"
    max_steps: int = 0  # 0: all steps; else only the first max_steps steps of every order
    seed: int = 0  # run seed mixed into every derived seed (distillation, buffer, evaluation)
    baseline: bool = True  # also train the random-buffer baseline
    buffer_source: str = "random"  # "random": fresh random real images; "init": a real-init set's init images

    def seeds(self) -> List[int]:
        return list(range(self.orders)) if self.order_seeds is None else [int(s) for s in self.order_seeds]

    def validate(self) -> None:
        check_positive_int("classes_per_step", self.classes_per_step)
        check_positive_int("orders", self.orders)
        check_positive_int("max_steps", self.max_steps, minimum=0)
        if self.order_seeds is not None and not self.order_seeds:
            raise ValueError("order_seeds: is empty")
        if self.order_seeds is not None and len(set(self.order_seeds)) != len(self.order_seeds):
            raise ValueError(f"order_seeds: has duplicates ({list(self.order_seeds)}); each order would count twice")
        if self.order_source not in ("numpy", "torch"):
            raise ValueError(f"order_source: expected 'numpy' or 'torch', got {self.order_source!r}")
        if self.buffer_source not in ("random", "init"):
            raise ValueError(f"buffer_source: expected 'random' or 'init', got {self.buffer_source!r}")


def _mean_std(values: Sequence[float]):
    t = torch.tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        return float("nan"), float("nan")
    return float(t.mean()), float(t.std(unbiased=False)) if t.numel() > 1 else 0.0


def check_inputs(train: ImageDataset, test: ImageDataset, cfg: ContinualConfig, ipc: int) -> None:
    """Raise a clear error for protocol settings the data cannot satisfy."""
    cfg.validate()
    check_positive_int("ipc", ipc)
    if train.num_classes != test.num_classes:
        raise ValueError(f"test: has {test.num_classes} classes, the training split {train.num_classes}")
    if train.num_classes % cfg.classes_per_step:
        raise ValueError(f"classes_per_step: {train.num_classes} classes of {train.name} cannot be split into "
                         f"equal steps of {cfg.classes_per_step}")
    counts = train.class_counts()
    if ipc > int(counts.min()):
        c = int(counts.argmin())
        raise ValueError(f"ipc={ipc} is larger than class {c} of {train.name}, which has only "
                         f"{int(counts.min())} images")
    tcounts = test.class_counts()
    if int(tcounts.min()) == 0:
        raise ValueError(f"test: class {int(tcounts.argmin())} has no test images")


# ----------------------------------------------------------------------------------------- run
def _last_epoch(accs: torch.Tensor) -> torch.Tensor:
    """[M] accuracies after the last epoch: the idc protocol's [M, P] checkpoints end with it."""
    return accs[:, -1] if accs.dim() == 2 else accs


def run_continual(
    method_name: str,
    method_config,
    train: ImageDataset,
    test: ImageDataset,
    cfg: ContinualConfig,
    eval_cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    log: Optional[Callable[[str], None]] = None,
    progress: bool = False,
) -> dict:
    """Run the protocol for one method; returns the JSON-ready result dict.

    ``method_config``: an instance of the method's ``config_cls`` (its ``ipc`` is the per-class storage
    budget, its ``seed`` is replaced per order and step). Result keys: ``config``, ``orders`` (per order:
    ``order_seed``, ``class_order``, ``steps`` with per step ``new_classes``, ``classes_seen``,
    ``memory_images``, ``buffer_images``, ``memory_class_counts``, ``stored_floats`` (memory) and
    ``buffer_floats``, ``method_accuracies`` / ``buffer_accuracies`` (percent, one per model),
    ``distill_seconds``, ``eval_seconds``), ``summary`` (per step mean +- std over orders x models),
    ``timings`` (totals).
    """
    if eval_cfg.protocol == "kd":
        raise ValueError("eval_cfg.protocol: kd needs a teacher, which the continual protocol does not have; "
                         "use dm or idc")
    from . import methods

    cls = methods.get(method_name)
    if not isinstance(method_config, cls.config_cls):
        raise TypeError(f"method_config: expected {cls.config_cls.__name__}, got {type(method_config).__name__}")
    method_config.validate()
    eval_cfg.validate()
    ipc = int(method_config.ipc)
    check_inputs(train, test, cfg, ipc)
    device = torch.device(device)
    log = log or (lambda s: None)
    k = train.num_classes
    train_d, test_d = train.to(device), test.to(device)
    per_pixel = int(np.prod(train.images.shape[1:]))
    orders = class_orders(k, cfg.seeds(), cfg.order_source)
    m = eval_cfg.num_models
    start_all = time.perf_counter()
    distill_total = eval_total = 0.0
    out_orders = []
    for order_seed, order in zip(cfg.seeds(), orders):
        steps = split_steps(order, cfg.classes_per_step)
        if cfg.max_steps:
            steps = steps[:cfg.max_steps]
        memory, buffer = Memory(), Memory()
        records = []
        seen: List[int] = []
        for t, new in enumerate(steps):
            seen = seen + new
            # ---- distil the new classes from their own training images only
            t0 = time.perf_counter()
            sub = restrict_classes(train_d, new)
            mcfg = dataclasses.replace(method_config, seed=derived_seed(cfg.seed, order_seed, t, 0) % (2 ** 31))
            method = cls(mcfg, sub, device=device).fit(progress=progress)
            tensors = method.synthetic_set()
            mapping = torch.tensor(new, device=device)
            # the saved set's training images: decoded for DANCE, reconstructed for a low-rank set
            images = synset_images(tensors).float().to(device)
            memory.add(images, mapping[tensors["labels"].to(device)])
            distill_s = time.perf_counter() - t0
            stored = stored_floats(tensors)
            # ---- the random buffer for the same classes
            if cfg.baseline:
                g = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, order_seed, t, 1))
                init = tensors.get("init_indices")
                if (cfg.buffer_source == "init" and init is not None
                        and method.images_per_class == ipc):
                    init = init.to(device)
                    buffer.add(sub.images[init], mapping[sub.labels[init]])
                else:
                    buffer.add(*random_buffer(train_d, new, ipc, g))
            # ---- train fresh models on the memories, test on the seen classes
            t1 = time.perf_counter()
            test_seen = select_classes(test_d, seen)
            eval_seed = derived_seed(cfg.seed, order_seed, t, 2)
            # idc: only the last epoch's accuracy is reported, so no intermediate test passes (eval_every 0)
            ecfg = dataclasses.replace(eval_cfg, seed=eval_seed % (2 ** 31),
                                       eval_every=0 if eval_cfg.protocol == "idc" else eval_cfg.eval_every)
            model_seeds = [derived_seed(cfg.seed, order_seed, t, 3, i) for i in range(m)]
            # the buffer is trained in its own call with its own generator, so its accuracies do not depend
            # on the method it is compared with (same seeds -> the same buffer numbers for every method)
            sides = [(memory, torch.Generator(device=device).manual_seed(eval_seed))]
            if cfg.baseline:
                sides.append((buffer, torch.Generator(device=device).manual_seed(
                    derived_seed(cfg.seed, order_seed, t, 4))))
            accs = torch.cat([
                _last_epoch(train_stacked(mem.images.unsqueeze(0).expand(m, *mem.images.shape),
                                          mem.labels.unsqueeze(0).expand(m, -1), test_seen.images, test_seen.labels,
                                          k, ecfg, dataset_name=train.name, model_seeds=model_seeds, generator=gen,
                                          protocol=ecfg.protocol))
                for mem, gen in sides])
            accs = (accs * 100).tolist()
            eval_s = time.perf_counter() - t1
            distill_total += distill_s
            eval_total += eval_s
            rec = {
                "step": t, "new_classes": list(new), "classes_seen": list(seen),
                "memory_images": int(memory.images.shape[0]),
                "memory_class_counts": {str(c): int(n) for c, n in
                                        zip(seen, memory.class_counts(k)[torch.tensor(seen)].tolist())},
                "stored_floats_step": stored,
                "buffer_images": int(buffer.images.shape[0]) if cfg.baseline else 0,
                "buffer_floats": int(buffer.images.shape[0]) * per_pixel if cfg.baseline else 0,
                "method_accuracies": accs[:m], "buffer_accuracies": accs[m:],
                "distill_seconds": distill_s, "eval_seconds": eval_s, "test_images": int(test_seen.images.shape[0]),
            }
            records.append(rec)
            mm, ms = _mean_std(rec["method_accuracies"])
            line = f"order {order_seed} step {t} classes {seen}: {method_name} {mm:.1f} ± {ms:.1f}"
            if cfg.baseline:
                bm, bs = _mean_std(rec["buffer_accuracies"])
                line += f"   random buffer {bm:.1f} ± {bs:.1f}"
            log(line + f"   (distil {distill_s:.1f} s, eval {eval_s:.1f} s)")
        stored_total = 0
        for rec in records:
            stored_total += rec["stored_floats_step"]
            rec["stored_floats"] = stored_total
        out_orders.append({"order_seed": order_seed, "class_order": list(order), "steps": records})
    n_steps = len(out_orders[0]["steps"])
    summary = []
    for t in range(n_steps):
        meth = [a for o in out_orders for a in o["steps"][t]["method_accuracies"]]
        buf = [a for o in out_orders for a in o["steps"][t]["buffer_accuracies"]]
        mm, ms = _mean_std(meth)
        row = {"step": t, "classes_seen": (t + 1) * cfg.classes_per_step, "method_mean": mm, "method_std": ms,
               "runs": len(meth), "chance": 100.0 / ((t + 1) * cfg.classes_per_step)}
        if cfg.baseline:
            bm, bs = _mean_std(buf)
            row.update(buffer_mean=bm, buffer_std=bs)
        summary.append(row)
    return {
        "method": cls.name, "dataset": train.name, "ipc": ipc,
        "images_per_class": int(method.images_per_class),
        "config": {"continual": asdict(cfg), "method": method_config.to_dict(), "eval": asdict(eval_cfg)},
        "orders": out_orders, "summary": summary,
        "timings": {"distill_seconds": distill_total, "eval_seconds": eval_total,
                    "total_seconds": time.perf_counter() - start_all},
        "device": str(device),
    }


def format_table(result: dict) -> str:
    """A per-step Markdown table: method vs random buffer (mean ± std over orders x models, %)."""
    name = result["method"]
    has_buf = "buffer_mean" in result["summary"][0]
    head = f"| step | classes seen | chance | {name} |" + (" random buffer |" if has_buf else "")
    sep = "|---|---|---|---|" + ("---|" if has_buf else "")
    lines = [head, sep]
    for row in result["summary"]:
        line = (f"| {row['step'] + 1} | {row['classes_seen']} | {row['chance']:.1f} | "
                f"{row['method_mean']:.1f} ± {row['method_std']:.1f} |")
        if has_buf:
            line += f" {row['buffer_mean']:.1f} ± {row['buffer_std']:.1f} |"
        lines.append(line)
    return "\n".join(lines)
