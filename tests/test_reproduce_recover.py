"""``benchmarks/reproduce_{sre2l,dwa}.py --smoke``: the whole reproduction pipeline (teacher, recover, KD
evaluation against the paired real subset, a saved set) runs on digits and prints its row."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("name", ["sre2l", "dwa"])
def test_reproduce_script_smoke_run(name, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(f"reproduce_{name}")
    assert module.main(["--smoke", "--out", str(tmp_path / "sets")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "| digits | 2 |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[9] != "-" and "±" in cells[9] and "±" in cells[10]  # set and paired subset accuracies
    assert (tmp_path / "sets" / "digits_ipc2").exists()
    assert "smoke run: nothing appended" in out
    assert not (BENCH / "results" / f"reproduce_{name}.md").exists() or "digits" not in \
        (BENCH / "results" / f"reproduce_{name}.md").read_text()


def test_reproduce_script_needs_a_teacher(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("reproduce_sre2l")
    with pytest.raises(SystemExit, match="--teacher"):
        module.main(["--dataset", "digits", "--ipc", "1"])
    sys.modules.pop("reproduce_sre2l", None)
