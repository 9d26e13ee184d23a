"""SRe2L / DWA recover sharded across processes: per-unit randomness, 2-process gloo ``torchrun`` runs equal to
the 1-process run IPC index for IPC index (sre2l, and dwa in ``accumulate`` mode), a rank killed with SIGKILL
mid-run resumes exactly, the clear error for a method that cannot be sharded, and the ImageNet-layout JPEG
folder read back through fastdd's image-folder reader.

Data: the bundled 8x8 digits; a ConvNetBN teacher squeezed for one epoch. Each torchrun child runs with one
thread (torchrun's OMP_NUM_THREADS=1), and so does the in-process reference (``single_thread``)."""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import helpers
import pytest
import torch

from fastdd.cli import main
from fastdd.data.folder import read_image_folder
from fastdd.methods import get
from fastdd.methods.recover import unit_generator, unit_seeds
from fastdd.squeeze import SqueezeConfig, squeeze
from fastdd.synset import class_folder_names, load_synset, to_pixels

ROOT = Path(__file__).resolve().parents[1]
IPC = 3  # IPC indices 0, 2 on rank 0 and 1 on rank 1
FLAGS = ["--dataset", "digits", "--ipc", str(IPC), "--iterations", "4", "--batch-classes", "4", "--seed", "1",
         "--device", "cpu", "--no-progress", "--checkpoint-every", "3"]
DWA_FLAGS = ["--rho", "0.5", "--perturb-steps", "2", "--dwa-mode", "accumulate"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits_train):
    out = tmp_path_factory.mktemp("teacher")
    squeeze(digits_train, SqueezeConfig(model="ConvNetBN", epochs=1, batch_size=64, lr=0.01), out, progress=False)
    return str(out)


def method_flags(method: str, teacher: str):
    return ["--method", method, "--teacher", teacher, *FLAGS, *(DWA_FLAGS if method == "dwa" else [])]


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory, single_thread):
    """{method: output directory of the ordinary 1-process run}."""
    runs = {}
    for method in ("sre2l", "dwa"):
        out = tmp_path_factory.mktemp(f"ref-{method}")
        assert main(["distill", *method_flags(method, teacher), "--out", str(out)]) == 0
        runs[method] = out
    return runs


def torchrun(args, nproc=2, extra_env=None, timeout=180) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC -m fastdd ARGS`` (:func:`helpers.torchrun`)."""
    return helpers.torchrun(["-m", "fastdd", *args], nproc=nproc, extra_env=extra_env, timeout=timeout)


def by_ipc_index(images: torch.Tensor, labels: torch.Tensor):
    """[IPC, K, C, H, W]: entry j holds image j of every class (the set is class-major)."""
    k = int(labels.max()) + 1
    assert torch.equal(labels, torch.arange(k).repeat_interleave(IPC))
    return images.view(k, IPC, *images.shape[1:]).transpose(0, 1)


def assert_same_set(got_dir: Path, want_dir: Path):
    got, want = load_synset(got_dir), load_synset(want_dir)
    g, w = by_ipc_index(got["images"], got["labels"]), by_ipc_index(want["images"], want["labels"])
    for j in range(IPC):
        assert torch.equal(g[j], w[j]), f"IPC index {j} differs"
    for key in ("labels", "init_indices"):
        assert (key in got) == (key in want) and (key not in got or torch.equal(got[key], want[key]))
    assert got["metadata"]["iterations_done"] == want["metadata"]["iterations_done"]
    assert got["metadata"]["final_loss"] == want["metadata"]["final_loss"]


# ------------------------------------------------------------------------------------------------ in-process
def test_unit_seeds_are_documented_seedsequence_words():
    import numpy as np

    w = [int(v) for v in np.random.SeedSequence((7, 3)).generate_state(4, np.uint32)]
    assert unit_seeds(7, 3) == ((w[0] << 32) | w[1], (w[2] << 32) | w[3])
    assert unit_seeds(7, 3) != unit_seeds(7, 4) and unit_seeds(7, 3) != unit_seeds(8, 3)
    assert unit_seeds(-1, 0) == unit_seeds(2 ** 64 - 1, 0)


def test_noise_init_comes_from_each_units_own_generator(teacher, digits_train):
    cls = get("sre2l")
    m = cls(cls.config_cls(teacher=teacher, ipc=2, iterations=1, batch_classes=4, seed=3), digits_train)
    for unit in range(m.units):
        rows = m.unit_rows(unit)[2]
        want = torch.randn((rows.numel(), 1, 8, 8), generator=unit_generator(3, unit, "init"))
        assert torch.equal(m.images.detach()[rows], want)


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_shards_merged_in_process_equal_the_whole_run(method, teacher, digits_train):
    cls = get(method)
    extra = dict(rho=0.5, perturb_steps=2, dwa_mode="accumulate") if method == "dwa" else {}
    cfg = cls.config_cls(teacher=teacher, ipc=IPC, iterations=3, batch_classes=4, seed=1, **extra)
    whole = cls(cfg, digits_train).fit(progress=False)
    states = []
    for rank in (1, 0):  # any order
        m = cls(cfg, digits_train).shard(rank, 2)
        assert m.shard_units == [u for u in range(9) if (u // 3) % 2 == rank]
        states.append(copy.deepcopy(m.fit(progress=False).state_dict()))
    merged = cls(cfg, digits_train).merge_shards(states)
    assert torch.equal(merged.synthetic_set()["images"], whole.synthetic_set()["images"])
    assert merged.iteration == whole.iteration and merged.last_loss == whole.last_loss
    with pytest.raises(ValueError, match="stopped at step"):
        cls(cfg, digits_train).merge_shards([states[1], dict(states[0], iteration=2)])
    with pytest.raises(ValueError, match="rank 1 of 2"):
        cls(cfg, digits_train).load_state_dict(states[0])  # a shard's state into a 1-process run


def test_unsupported_method_is_a_clear_error_under_world_size_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code = main(["distill", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", "1",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--method dm: cannot run sharded across 2 processes" in err and "sre2l, dwa" in err, err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_torchrun_two_processes_equal_one_process(method, teacher, reference, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(["distill", *method_flags(method, teacher), "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_set(out, reference[method])
    assert sorted(p.name for p in out.glob("checkpoint*.pt")) == ["checkpoint.rank0.pt", "checkpoint.rank1.pt"]
    assert load_synset(out)["metadata"]["processes"] == 2
    assert sorted(p.name for p in (out / "train").iterdir() if not p.name.startswith(".")) == [str(c) for c in range(10)]


def test_killed_rank_resumes_exactly(teacher, reference, tmp_path):
    out = tmp_path / "run"
    args = ["distill", *method_flags("dwa", teacher), "--out", str(out)]
    # rank 1 (IPC index 1: 3 units x 4 steps) SIGKILLs itself once step 7 is computed: the last checkpoint
    # is step 6, inside its second unit (Adam, unit generator and accumulated perturbation in flight)
    killed = torchrun(args, extra_env={"FASTDD_KILL_AT": "1:7"})
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "Signals.SIGKILL" in killed.stdout + killed.stderr or "-9" in killed.stdout + killed.stderr
    assert not (out / "synthetic.pt").exists()
    state = torch.load(out / "checkpoint.rank1.pt", weights_only=True)["state"]
    assert state["iteration"] == 6 and state["shard"] == [1, 2]
    refused = torchrun(args)  # the run's directory holds a run: --resume or --force needed
    assert refused.returncode != 0 and "--resume" in refused.stdout + refused.stderr
    resumed = torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "rank 1/2: resumed" in resumed.stderr and "at iteration 6" in resumed.stderr
    assert_same_set(out, reference["dwa"])


# ------------------------------------------------------------------------------------------------ JPEG folder
def test_jpeg_folder_reads_back_through_the_image_folder_reader(reference, tmp_path, teacher):
    out = reference["sre2l"]
    syn = load_synset(out)
    assert (out / "train" / "3" / "002.jpg").is_file()
    images, labels, classes = read_image_folder(out, "train", channels=1)
    assert classes == [str(c) for c in range(10)]
    assert torch.equal(torch.from_numpy(labels), syn["labels"])
    want = to_pixels(syn["images"], syn["metadata"]["mean"], syn["metadata"]["std"]).int()
    diff = (torch.from_numpy(images).int() - want).abs().float()
    assert diff.mean() < 4.0 and diff.max() <= 64, (float(diff.mean()), float(diff.max()))
    # --no-jpeg writes none; a foreign train/ folder in --out is refused before any work
    assert main(["distill", *method_flags("sre2l", teacher), "--iterations", "1", "--no-jpeg",
                 "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "train").exists()
    (tmp_path / "foreign" / "train" / "cat").mkdir(parents=True)
    assert main(["distill", *method_flags("sre2l", teacher), "--out", str(tmp_path / "foreign")]) == 2
    assert (tmp_path / "foreign" / "train" / "cat").is_dir() and not (tmp_path / "foreign" / "synthetic.pt").exists()


def test_class_folder_names():
    assert class_folder_names(3, ["n01", "n02", "n03"]) == ["n01", "n02", "n03"]  # wnids: sorted, kept
    assert class_folder_names(3, ["b", "a", "c"]) == ["000", "001", "002"]  # unsorted: a reader would relabel
    assert class_folder_names(2, ["T-shirt/top", "x"]) == ["000", "001"]  # not a folder name
    assert class_folder_names(1001, None)[-1] == "1000"
