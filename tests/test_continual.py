"""Class-incremental protocol (fastdd.continual): orders, restricted data, memory union, baseline, bad
input, and a small real run on Fashion-MNIST (DM memory vs random buffer)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from fastdd.continual import (
    ContinualConfig,
    Memory,
    class_orders,
    format_table,
    random_buffer,
    restrict_classes,
    run_continual,
    select_classes,
    split_steps,
)
from fastdd.data import ImageDataset, stratified_subset
from fastdd.evaluate import EvalConfig
from fastdd.methods import get


def _toy(num_classes=6, per_class=12, seed=0, size=8):
    """A tiny labelled dataset whose class c images have mean c (so classes are separable)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    perm = torch.randperm(labels.numel(), generator=g)
    labels = labels[perm]
    images = torch.randn(labels.numel(), 1, size, size, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float()
    return ImageDataset("toy", "train", images, labels, num_classes, mean=(0.0,), std=(1.0,))


# ----------------------------------------------------------------------------------------- orders
def test_orders_reproducible_permutations_and_reference_numpy_orders():
    a = class_orders(10, range(5))
    assert a == class_orders(10, range(5))
    assert len({tuple(o) for o in a}) == 5  # different seeds give different orders
    for s, o in enumerate(a):
        assert sorted(o) == list(range(10))
        # the reference: np.random.seed(s); np.random.permutation(10) (same stream as RandomState(s))
        assert o == np.random.RandomState(s).permutation(10).tolist()
    t = class_orders(10, [3], source="torch")[0]
    assert sorted(t) == list(range(10)) and t == class_orders(10, [3], source="torch")[0]


@pytest.mark.parametrize("k,per", [(10, 2), (10, 5), (12, 3), (4, 4)])
def test_split_steps_equal_chunks_cover_the_order(k, per):
    order = class_orders(k, [1])[0]
    steps = split_steps(order, per)
    assert len(steps) == k // per and all(len(s) == per for s in steps)
    assert [c for s in steps for c in s] == order


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="classes_per_step"):
        split_steps(list(range(10)), 3)
    with pytest.raises(ValueError, match="order_source"):
        class_orders(10, [0], source="python")
    train = _toy()
    dm = get("dm")
    eval_cfg = EvalConfig(model="ConvNetW32", num_models=1, epochs=1)
    with pytest.raises(ValueError, match="classes_per_step"):
        run_continual("dm", dm.config_cls(ipc=1, iterations=1, batch_real=2), train, train,
                      ContinualConfig(classes_per_step=4, orders=1), eval_cfg)
    with pytest.raises(ValueError, match="ipc=13 is larger than class"):
        run_continual("dm", dm.config_cls(ipc=13, iterations=1, batch_real=2), train, train,
                      ContinualConfig(orders=1), eval_cfg)
    with pytest.raises(ValueError, match="ipc"):
        random_buffer(train, [0, 1], 13, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="method_config"):
        run_continual("dm", EvalConfig(), train, train, ContinualConfig(orders=1), eval_cfg)
    with pytest.raises(ValueError, match="classes"):
        restrict_classes(train, [0, 0])
    with pytest.raises(ValueError, match="classes"):
        restrict_classes(train, [6])
    with pytest.raises(ValueError, match="unknown method"):
        run_continual("no-such-method", None, train, train, ContinualConfig(orders=1), eval_cfg)


# ----------------------------------------------------------------------------------------- data and memory
def test_restrict_classes_relabels_in_order_and_maps_back():
    train = _toy()
    classes = [4, 1]
    sub = restrict_classes(train, classes)
    assert sub.num_classes == 2 and sub.class_names == ["4", "1"]
    back = torch.tensor(classes)[sub.labels]
    mask = torch.isin(train.labels, torch.tensor(classes))
    assert torch.equal(sub.images, train.images[mask]) and torch.equal(back, train.labels[mask])
    sel = select_classes(train, classes)
    assert sel.num_classes == 6 and set(sel.labels.tolist()) == {1, 4}


def test_memory_union_global_labels_and_counts_and_buffer_same_counts():
    train = _toy()
    mem, buf = Memory(), Memory()
    g = torch.Generator().manual_seed(0)
    for step in split_steps(class_orders(6, [2])[0], 2):
        x, y = random_buffer(train, step, 3, g)
        assert y.tolist() == [c for c in step for _ in range(3)]  # class-major, global labels
        # each drawn image really belongs to its (global) class: class c images have mean ~ c
        assert torch.allclose(x.mean((1, 2, 3)), y.float(), atol=0.5)
        mem.add(x, y)
        buf.add(*random_buffer(train, step, 3, g))
    assert mem.class_counts(6).tolist() == [3] * 6 == buf.class_counts(6).tolist()
    with pytest.raises(ValueError, match="already in the memory"):
        mem.add(x, y)


def test_run_continual_records_memory_union_and_is_reproducible():
    train = _toy(num_classes=4, per_class=10)
    dm = get("dm")
    cfg = dm.config_cls(ipc=2, iterations=2, batch_real=4, model="ConvNetW32", dsa=False)
    cl = ContinualConfig(orders=2, classes_per_step=2)
    ev = EvalConfig(model="ConvNetW32", num_models=2, epochs=2, faithful_epochs=False, dsa=False)
    a = run_continual("dm", cfg, train, train, cl, ev)
    b = run_continual("dm", cfg, train, train, cl, ev)
    assert [o["class_order"] for o in a["orders"]] == class_orders(4, [0, 1])
    for order in a["orders"]:
        seen = []
        for step in order["steps"]:
            seen += step["new_classes"]
            assert step["classes_seen"] == seen
            assert step["memory_images"] == step["buffer_images"] == 2 * len(seen)
            assert step["memory_class_counts"] == {str(c): 2 for c in seen}
            assert len(step["method_accuracies"]) == len(step["buffer_accuracies"]) == 2
            assert step["stored_floats"] == 2 * len(seen) * 64 == step["buffer_floats"]
            assert step["test_images"] == 10 * len(seen)
    assert len(a["summary"]) == 2 and a["summary"][0]["runs"] == 4
    strip = lambda r: [[(s["method_accuracies"], s["buffer_accuracies"]) for s in o["steps"]] for o in r["orders"]]
    assert strip(a) == strip(b)  # seeded: the same accuracies twice
    # the buffer does not depend on the method it is compared with (its own seeds, its own training)
    # (here: the low-rank plugin, rank 2 on 8x8 images = 4 images per class in the storage of 2)
    c = run_continual("dm", dataclasses.replace(cfg, rank=2), train, train, dataclasses.replace(cl, orders=1), ev)
    c0, a0 = c["orders"][0]["steps"], a["orders"][0]["steps"]
    assert c["images_per_class"] == 4 and c0[0]["memory_images"] == 8 and c0[0]["buffer_images"] == 4
    assert c0[1]["stored_floats"] <= c0[1]["buffer_floats"]  # same storage budget as the plain buffer
    assert [s["buffer_accuracies"] for s in c0] == [s["buffer_accuracies"] for s in a0]
    json.dumps(a)
    assert "random buffer" in format_table(a)


# ----------------------------------------------------------------------------------------- real data
def test_dm_memory_beats_random_buffer_on_fashion_mnist(fmnist):
    """One class order, its first 3 steps of 2 classes, IPC 1, small budgets (ConvNet width 32).

    Asserted: (1) at every step both memories give accuracy well above chance on the seen classes;
    (2) averaged over the steps, the DM memory beats the random buffer by >= 3 points (DM at IPC 1 beats
    a random real image per class by far more than that on Fashion-MNIST; 3 points is the margin of
    tests/test_dm_real_data.py); (3) no single step has the DM memory more than 5 points below the
    buffer (noise allowance for 2 models on 60 test images per class).
    """
    train, test = fmnist
    train = stratified_subset(train, 200, torch.Generator().manual_seed(0))
    test = stratified_subset(test, 60)
    dm = get("dm")
    cfg = dm.config_cls(ipc=1, iterations=30, batch_real=16, model="ConvNetW32")
    ev = EvalConfig(model="ConvNetW32", num_models=2, epochs=30, faithful_epochs=False)
    res = run_continual("dm", cfg, train, test, ContinualConfig(orders=1, max_steps=3), ev, log=print)
    print(format_table(res))
    method = [r["method_mean"] for r in res["summary"]]
    buffer = [r["buffer_mean"] for r in res["summary"]]
    for row in res["summary"]:
        chance = row["chance"]
        assert row["method_mean"] > chance + 15 and row["buffer_mean"] > chance + 10, row
    assert np.mean(method) >= np.mean(buffer) + 3.0, (method, buffer)
    assert all(m >= b - 5.0 for m, b in zip(method, buffer)), (method, buffer)


def test_cli_continual_writes_json_and_table(tmp_path, capsys):
    from fastdd.cli import main

    out = tmp_path / "cl"
    rc = main(["continual", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "2",
               "--batch-real", "4", "--model", "ConvNetW32", "--epochs", "2", "--models", "1", "--orders", "1",
               "--max-steps", "2", "--test-per-class", "5", "--no-dsa", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "continual.json").read_text())
    assert res["method"] == "dm" and len(res["summary"]) == 2 and res["config"]["method"]["iterations"] == 2
    assert res["orders"][0]["class_order"] == class_orders(10, [0])[0]
    assert "random buffer" in (out / "continual.md").read_text() and "random buffer" in capsys.readouterr().out
    assert main(["continual", "--dataset", "digits", "--classes-per-step", "3", "--out", str(out)]) == 2


def test_eval_protocol_reaches_the_training_loop(monkeypatch):
    """``EvalConfig.protocol`` chooses the loop the memories are trained with (it was always the DM loop): idc's
    per-checkpoint accuracies are reduced to the last epoch's; kd (no teacher) is refused."""
    from fastdd import continual as cl_module

    seen = []
    real = cl_module.train_stacked

    def spy(*args, **kwargs):
        seen.append(kwargs.get("protocol"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cl_module, "train_stacked", spy)
    train = _toy(num_classes=4, per_class=10)
    dm = get("dm")
    cfg = dm.config_cls(ipc=1, iterations=1, batch_real=4, model="ConvNetW32", dsa=False)
    cl = ContinualConfig(orders=1, classes_per_step=2, max_steps=1)
    ev = EvalConfig(model="ConvNetW32", num_models=2, epochs=4, faithful_epochs=False, dsa=False, protocol="idc",
                    eval_every=2, batch_size=4)
    res = run_continual("dm", cfg, train, train, cl, ev)
    assert seen == ["idc", "idc"]  # memory and buffer
    assert len(res["orders"][0]["steps"][0]["method_accuracies"]) == 2
    with pytest.raises(ValueError, match="eval_cfg.protocol: kd"):
        run_continual("dm", cfg, train, train, cl, dataclasses.replace(ev, protocol="kd"))


def test_cli_continual_eval_protocol_idc_takes_its_defaults(tmp_path):
    from fastdd.cli import main

    out = tmp_path / "cl"
    base = ["continual", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1", "--batch-real",
            "4", "--model", "ConvNetW32", "--epochs", "2", "--models", "1", "--orders", "1", "--max-steps", "1",
            "--test-per-class", "3", "--no-dsa", "--device", "cpu"]
    assert main(base + ["--eval-protocol", "idc", "--out", str(out)]) == 0
    ev = json.loads((out / "continual.json").read_text())["config"]["eval"]
    assert ev["protocol"] == "idc" and ev["cutmix_p"] == 0.5 and ev["batch_size"] == 64 and ev["epochs"] == 2
    assert main(base + ["--eval-protocol", "kd", "--out", str(tmp_path / "kd")]) == 2
