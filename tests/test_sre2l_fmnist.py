"""SRe2L and DWA end to end on the real Fashion-MNIST under the KD protocol, at a CPU budget: a small BN
teacher from squeeze, IPC-10 sets from both methods, students trained with online teacher soft labels on
the set and on a same-size real subset (paired initialisations; for DWA exactly its initial real images).

Measured at this budget (2-core AMD EPYC): teacher 80.2 % on the 1000 test images; with 2 students each,
DWA 39.7 vs 29.25 % for its initial real images, SRe2L 35.45 vs 34.10 % for a random real subset. DWA's margin
is asserted; SRe2L's is within noise here, so for SRe2L the test asserts what holds: its noise-initialised
images alone teach the students far above chance (README, "SRe2L and DWA"). With the per-unit random streams of
the recover loop (since the torchrun sharding), the test's own setting (1 student per side) gave DWA 45.5 vs
35.3 % and SRe2L 37.5 vs 31.3 % (2026-12-04). CPU time, one thread: squeeze
17 s, each recover 20 s, each KD evaluation (1 student per side) about 45 s."""
from __future__ import annotations

import json

import pytest
import torch

from fastdd.data import stratified_subset
from fastdd.evaluate import evaluate_synset, protocol_config
from fastdd.methods import get
from fastdd.squeeze import SqueezeConfig, squeeze

TEACHER = dict(model="ConvNetW32BN", epochs=5, train_subset=3000, lr=0.05, batch_size=64)
KD = dict(epochs=100, batch_size=100, num_models=1, model="ConvNetW32", compile="off")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fmnist):
    train, test = fmnist
    test_small = stratified_subset(test, 100)
    out = tmp_path_factory.mktemp("teacher")
    squeeze(train, SqueezeConfig(**TEACHER), out, test=test_small, progress=False)
    return train, test_small, str(out)


def run(name, train, test, teacher):
    cls = get(name)
    method = cls(cls.config_cls(teacher=teacher, ipc=10, iterations=100, seed=0), train).fit(progress=False)
    syn = method.synthetic_set()
    cfg = protocol_config("kd", teacher=teacher, **KD)
    return evaluate_synset(syn["images"], syn["labels"], train, test, cfg, baseline_indices=syn.get("init_indices"),
                           progress=False).to_dict()


def test_teacher_is_good(setup):
    _, _, teacher = setup
    assert json.loads(open(f"{teacher}/teacher.json").read())["test_accuracy"] > 0.7


def test_dwa_beats_its_initial_real_images_under_kd(setup):
    train, test, teacher = setup
    d = run("dwa", train, test, teacher)
    assert d["accuracy_mean"] >= d["random_baseline_mean"] + 3.0, d


def test_sre2l_images_from_noise_teach_far_above_chance_under_kd(setup):
    train, test, teacher = setup
    d = run("sre2l", train, test, teacher)
    assert d["accuracy_mean"] > 25.0, d  # 10 classes: chance is 10 %
    assert torch.isfinite(torch.tensor(d["accuracies"])).all()
