"""Helpers shared by the method tests."""
from __future__ import annotations


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
