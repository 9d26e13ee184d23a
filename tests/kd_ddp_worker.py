"""The runs that ``tests/test_kd_distributed.py`` compares: the online and the stored-label KD students trained
on FMNIST-shaped random data (1x28x28, 10 classes), once in-process (``ddp=False``) and once per rank under
``torchrun`` (``python tests/kd_ddp_worker.py TEACHER STORE OUT``, ``ddp=True``: rank 0 alone saves OUT).

Not a test module (no ``test_`` prefix): the test imports :func:`run` and launches this file with torchrun."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastdd.evaluate import fit_stacked_kd, fit_stacked_kd_stored, protocol_config, score_test_set  # noqa: E402

N, K = 7, 10  # 7 images, global batch 3: batches of 3, 3, 1 (rank 1 has no row of the last one)
#: (run name, preset, vectorise): cifar = AdamW + crop/flip + MixUp; tiny = SGD + warm-up + RRC/flip + CutMix + T^2;
#: cifar_vmap = the cifar run with the students' weights stacked and one vmap-ed forward (the CUDA default)
RUNS = (("cifar", "cifar", False), ("tiny", "tiny", False), ("cifar_vmap", "cifar", True))


def data():
    """(set [N, 1, 28, 28], baseline [N, 1, 28, 28], test images [40, 1, 28, 28], test labels [40])."""
    g = torch.Generator().manual_seed(5)
    return (torch.randn(N, 1, 28, 28, generator=g), torch.randn(N, 1, 28, 28, generator=g),
            torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, K, (40,), generator=g))


def config(preset: str, teacher: str, **extra):
    values = dict(kd_preset=preset, epochs=3, batch_size=3, num_models=2, model="ConvNetW32", teacher=teacher,
                  compile="off", warmup_epochs=1 if preset == "tiny" else None)
    return protocol_config("kd", **{**values, **extra})


def run(teacher: str, store_dir: str, ddp: bool) -> dict:
    """{run name: {"states": per-student state dicts, "acc": test accuracies [M]}} for every preset (online
    protocol, set and baseline stacked as evaluate_synset does) and for the stored labels of ``store_dir``."""
    from fastdd.relabel import RelabelStore
    from fastdd.teacher import load_teacher

    images, base, test_x, test_y = data()
    out = {}
    both = torch.cat([images.unsqueeze(0).expand(2, *images.shape), base.unsqueeze(0).expand(2, *base.shape)])
    for name, preset, vectorise in RUNS:
        cfg = config(preset, teacher, vectorise=vectorise)
        net = fit_stacked_kd(both, test_x, K, cfg, model_seeds=[11, 12, 11, 12],
                             generator=torch.Generator().manual_seed(0), dataset_name="fake", ddp=ddp)
        assert net.vectorised == vectorise
        out[name] = {"states": net.state_dicts(), "acc": score_test_set(net, test_x, test_y, cfg, ddp=ddp)}
    store = RelabelStore(store_dir)
    cfg = config("cifar", "", soft_labels=store_dir)
    tnet = load_teacher(teacher, 1, K, (28, 28))[0]
    net = fit_stacked_kd_stored([images, base], store, test_x, K, cfg, model_seeds=[11, 12], teacher=tnet, ddp=ddp)
    out["stored"] = {"states": net.state_dicts(), "acc": score_test_set(net, test_x, test_y, cfg, ddp=ddp)}
    return out


def main(teacher: str, store_dir: str, path: str) -> None:
    from fastdd import distributed

    torch.set_num_threads(1)
    ctx = distributed.from_env()
    distributed.init(ctx, torch.device("cpu"))
    try:
        result = run(teacher, store_dir, ddp=True)
        if ctx.rank == 0:
            torch.save(result, path)
        distributed.barrier()  # every rank done with its collectives before any leaves the group
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
