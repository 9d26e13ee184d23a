"""Evaluation: stacked training equals one-model-at-a-time, schedule, baseline pairing, errors."""
from __future__ import annotations

import pytest
import torch

from fastdd.evaluate import EvalConfig, StackedModels, epoch_learning_rates, evaluate_synset, train_stacked
from fastdd.models import get_model


def test_reference_schedule_counts_and_decay():
    lrs = epoch_learning_rates(EvalConfig(epochs=1000, lr=0.01))
    assert len(lrs) == 1001
    assert lrs.count(0.01) == 502 and all(abs(x - 0.001) < 1e-15 for x in lrs[502:])
    plain = epoch_learning_rates(EvalConfig(epochs=10, faithful_epochs=False))
    assert len(plain) == 10 and plain[:5] == [0.01] * 5 and all(abs(x - 0.001) < 1e-15 for x in plain[5:])


def test_stacked_models_match_separate_models():
    g = torch.Generator().manual_seed(0)
    models = [get_model("ConvNet", 1, 10, (8, 8), generator=g) for _ in range(3)]
    x = torch.randn(3, 6, 1, 8, 8, generator=g)
    stacked = StackedModels(models, vectorise=True)
    assert stacked.vectorised
    out = stacked(x)
    ref = torch.stack([m(xi) for m, xi in zip(models, x)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.shared(x[0]), torch.stack([m(x[0]) for m in models]), rtol=1e-5, atol=1e-5)


def _train(vectorised: bool, digits_train, digits_test):
    cfg = EvalConfig(num_models=2, epochs=6, batch_size=16, faithful_epochs=False, vectorise=vectorised)
    x = digits_train.images[:40].unsqueeze(0).expand(2, -1, -1, -1, -1)
    y = digits_train.labels[:40].unsqueeze(0).expand(2, -1)
    return train_stacked(x, y, digits_test.images, digits_test.labels, 10, cfg, dataset_name="digits",
                         model_seeds=[1, 2], generator=torch.Generator().manual_seed(0))


def test_vectorised_training_equals_model_loop(digits_train, digits_test):
    a = _train(True, digits_train, digits_test)
    b = _train(False, digits_train, digits_test)
    assert a.shape == (2,)
    torch.testing.assert_close(a, b, atol=2 / len(digits_test), rtol=0)  # at most a 1-sample flip


def test_random_baseline_is_the_given_subset_and_paired(digits_train, digits_test, monkeypatch):
    import fastdd.evaluate as ev

    calls = []
    real_train_stacked = ev.train_stacked

    def spy(x, y, *args, **kwargs):
        calls.append((x, y, list(kwargs["model_seeds"])))
        return real_train_stacked(x, y, *args, **kwargs)

    monkeypatch.setattr(ev, "train_stacked", spy)
    idx = torch.arange(0, 50)
    syn = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(num_models=2, epochs=2, batch_size=64)
    res = evaluate_synset(syn, digits_train.labels[idx], digits_train, digits_test, cfg, baseline_indices=idx)
    (x, y, seeds), = calls  # synthetic and baseline models trained together, in one stacked run
    assert x.shape[0] == 4 and seeds[:2] == seeds[2:]  # paired initialisations
    assert torch.equal(x[0], syn) and torch.equal(x[1], syn)
    assert torch.equal(x[2], digits_train.images[idx]) and torch.equal(x[3], digits_train.images[idx])
    assert torch.equal(y[2], digits_train.labels[idx])
    d = res.to_dict()
    assert len(d["accuracies"]) == len(d["random_baseline_accuracies"]) == 2
    for key in ("accuracy_mean", "accuracy_std", "random_baseline_mean", "random_baseline_std"):
        assert 0 <= d[key] <= 100


def test_learning_on_real_subset_beats_chance(digits_train, digits_test):
    from fastdd.data import ClassSampler

    idx = ClassSampler(digits_train.images, digits_train.labels, 10).first_indices(10).reshape(-1)
    cfg = EvalConfig(num_models=2, epochs=60, batch_size=256, faithful_epochs=False)
    res = evaluate_synset(digits_train.images[idx], digits_train.labels[idx], digits_train, digits_test, cfg,
                          with_baseline=False)
    assert min(res.accuracies) > 50  # chance is 10 %


def test_bad_inputs(digits_train, digits_test):
    cfg = EvalConfig(num_models=1, epochs=1)
    x, y = digits_train.images[:10].clone(), digits_train.labels[:10].clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images: contains NaN"):
        evaluate_synset(x, y, digits_train, digits_test, cfg)
    y_bad = y.clone()
    y_bad[0] = 10
    with pytest.raises(ValueError, match=r"labels: labels must lie in \[0, 10\)"):
        evaluate_synset(digits_train.images[:10], y_bad, digits_train, digits_test, cfg)
    with pytest.raises(ValueError, match="images: shape"):
        evaluate_synset(torch.zeros(10, 1, 9, 9), y, digits_train, digits_test, cfg)


def test_missing_class_is_refused_unless_allowed(digits_train, digits_test):
    from fastdd.data import ClassSampler

    idx = ClassSampler(digits_train.images, digits_train.labels, 10).first_indices(2).reshape(-1)
    keep = digits_train.labels[idx] != 7  # class 7 left out
    x, y = digits_train.images[idx][keep], digits_train.labels[idx][keep]
    cfg = EvalConfig(num_models=1, epochs=1, compile="off")
    with pytest.raises(ValueError, match=r"labels: class 7 has no images"):
        evaluate_synset(x, y, digits_train, digits_test, cfg, with_baseline=False, progress=False)
    cfg = EvalConfig(num_models=1, epochs=1, compile="off", allow_missing_classes=True)
    res = evaluate_synset(x, y, digits_train, digits_test, cfg, with_baseline=False, progress=False)
    assert len(res.accuracies) == 1 and 0 <= res.accuracies[0] <= 100


def test_progress_bar_counts_models_times_epochs(digits_train, digits_test, capsys):
    from fastdd.data import ClassSampler

    idx = ClassSampler(digits_train.images, digits_train.labels, 10).first_indices(1).reshape(-1)
    cfg = EvalConfig(num_models=2, epochs=3, faithful_epochs=False, compile="off")
    evaluate_synset(digits_train.images[idx], digits_train.labels[idx], digits_train, digits_test, cfg,
                    with_baseline=False, progress=True)
    err = capsys.readouterr().err
    assert "evaluate 2 models" in err and "0/6 [" in err  # total = models x epochs
    evaluate_synset(digits_train.images[idx], digits_train.labels[idx], digits_train, digits_test, cfg,
                    with_baseline=False, progress=False)
    assert "evaluate" not in capsys.readouterr().err


def test_cpu_test_pass_in_chunks_equals_one_batch(digits_train, digits_test):
    """The cache-sized, channels_last, all-models-per-chunk test pass gives the one-batch accuracies."""
    from fastdd.evaluate import accuracy_stacked

    g = torch.Generator().manual_seed(3)
    models = [get_model("ConvNet", 1, 10, (8, 8), generator=g) for _ in range(2)]
    net = StackedModels(models)
    chunked = accuracy_stacked(net, digits_test.images, digits_test.labels, 0)
    with torch.no_grad():
        whole = torch.stack([(m(digits_test.images).argmax(-1) == digits_test.labels).double().mean()
                             for m in models])
    torch.testing.assert_close(chunked, whole, atol=1.5 / len(digits_test), rtol=0)
