"""Integrity under faults: kills during checkpoint saves, damaged checkpoints, damaged caches.

A kill is injected through ``checkpoint._fault_hook`` (no timing): in-process it raises
:class:`Killed`, a ``BaseException`` that the save's clean-up lets through, so the files on disk
are those a kill at that instant leaves; one case kills a real subprocess with ``os._exit``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from fuxi_mme.cli import main
from fuxi_mme.data import load_dataset
from fuxi_mme.runs import load_run, load_trained
from fuxi_mme.train import checkpoint as ck
from fuxi_mme.train.run import train
from fuxi_mme.utils.integrity import verify_manifest

# best improves at epoch 2; one thread: the runs are tiny and the test machine is shared
FAST = {"data.demo_users": 64, "data.max_len": 10, "train.lr": 0.003, "train.epochs": 2, "train.num_threads": 1}
TIMING = ("seq_per_s", "epoch_seconds", "eval_seconds", "gpu_mem_gb")
CKPT_FILES = ("model.safetensors", "optim.safetensors", "state.json", "checksums.json")


class Killed(BaseException):
    """What the hook raises: like a kill, no ``except Exception`` clean-up runs."""


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in TIMING})
    return out


def final(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    # a resume from the final epoch's checkpoint knows the best validation NDCG@10 only
    return {**{k: m.get(k) for k in ("test", "selected_epoch", "epochs_trained")}, "valid_best": m["valid_best"]["NDCG@10"]}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # train.num_threads set it for the whole process


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; every interrupted-and-resumed run must equal it."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUXI_MME_DATA", str(root / "cache"))
        mp.setenv("FUXI_MME_OFFLINE", "1")
        train(tiny_config(**FAST, **{"log.run_dir": str(root / "run")}))
    return root / "run"


def kill_hook(step: str, tag: str, save: int = 2, action=None):
    """Kill at ``step`` of the ``save``-th save of checkpoint ``tag``."""
    seen = {"n": 0}

    def hook(s: str, folder: Path) -> None:
        if folder.name != tag:
            return
        if s == "begin":
            seen["n"] += 1
        if s == step and seen["n"] == save:
            (action or _raise)()

    return hook


def _raise():
    raise Killed


def resume(run: Path) -> None:
    train(load_run(run), resume=run)


def assert_equal_to_reference(run: Path, reference: Path) -> None:
    assert records(run) == records(reference)  # no duplicate epoch records, the same values
    assert final(run) == final(reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]  # no leftovers


# after-rename-old of "last" is killed for real, in a subprocess, below
CASES = [("last", s) for s in ck.FAULT_STEPS if s != "after-rename-old"] + [("best", "after-rename-old"), ("best", "after-rename-new")]


@pytest.mark.parametrize("tag,step", CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_kill_at_each_step_of_a_save_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, reference, tag, step):
    run = tmp_path / "run"
    monkeypatch.setattr(ck, "_fault_hook", kill_hook(step, tag))
    with pytest.raises(Killed):
        train(tiny_config(**FAST, **{"log.run_dir": str(run)}))
    monkeypatch.setattr(ck, "_fault_hook", None)
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last" in names or "last.old" in names  # something to resume from, at every step
    if (tag, step) == ("last", "begin"):  # killed between epoch 2's validation record and its last save
        assert [(r["kind"], r["epoch"]) for r in records(run)] == [("train", 1), ("valid", 1), ("train", 2), ("valid", 2)]
    resume(run)
    assert_equal_to_reference(run, reference)  # for last-begin: no duplicate epoch records


def test_a_real_kill_between_the_renames_leaves_a_resumable_run(tmp_path, reference):
    """os._exit in a subprocess: no Python clean-up at all runs."""
    run = tmp_path / "run"
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]);"
        "from conftest import tiny_config; from fuxi_mme.train import checkpoint as ck; from fuxi_mme.train.run import train;"
        "from test_faults import FAST, kill_hook;"
        "ck._fault_hook = kill_hook('after-rename-old', 'last', action=lambda: os._exit(9));"
        "train(tiny_config(**FAST, **{'log.run_dir': sys.argv[1]}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(run), str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stderr[-2000:]
    assert not (run / "checkpoints" / "last").exists() and (run / "checkpoints" / "last.old").is_dir()
    resume(run)
    assert_equal_to_reference(run, reference)


def test_stale_temporaries_are_removed_at_the_next_save(tmp_path, monkeypatch):
    import torch

    model = torch.nn.Linear(2, 2)
    target = tmp_path / "checkpoints" / "last"
    monkeypatch.setattr(ck, "_fault_hook", kill_hook("after-optim", "last", save=1))
    with pytest.raises(Killed):
        ck.save_checkpoint(target, model, {"epoch": 1})
    assert [p.name.startswith(".last.tmp-") for p in target.parent.iterdir()] == [True]
    monkeypatch.setattr(ck, "_fault_hook", None)
    ck.save_checkpoint(target, model, {"epoch": 1})
    assert [p.name for p in target.parent.iterdir()] == ["last"]


def test_truncate_metrics_log_keeps_the_checkpointed_epochs(tmp_path):
    f = tmp_path / "metrics.jsonl"
    recs = [{"kind": k, "epoch": e} for e in (1, 2, 3) for k in ("train", "valid")] + [{"kind": "test", "epoch": 2}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra')  # a line torn by a kill
    assert ck.truncate_metrics_log(f, 2) == 4
    assert [json.loads(x) for x in f.read_text().splitlines()] == recs[:4]
    assert ck.truncate_metrics_log(f, 2) == 0


# ---------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUXI_MME_DATA", str(root / "cache"))
        mp.setenv("FUXI_MME_OFFLINE", "1")
        train(tiny_config(**{**FAST, "train.epochs": 1, "log.run_dir": str(root / "run")}))
    return root / "run"


def flip(path: Path, pos: int | None = None, bit: int = 0) -> None:
    """Flip one bit in place (flipping it again restores the file)."""
    pos = path.stat().st_size // 2 if pos is None else pos
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << bit)]))


HOLD = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX);print('held', flush=True); time.sleep(120)"
)


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_run_folder_another_process_writes_is_refused_and_freed_when_it_ends(tmp_path, trained, capsys):
    """Two processes never write one run: a second training into a folder that a live process
    holds stops with one line and writes nothing; the lock goes with its holder, however it ends."""
    from fuxi_mme.utils.locks import held, in_use

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held" and in_use(run)
        assert main(["train", "--resume", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by another training process" in err[0] and str(run) in err[0], err
        assert records(run) == records(trained)
    finally:
        holder.kill()  # a kill, not a clean exit: the kernel still drops the lock
        holder.wait()
    assert not in_use(run)
    fresh = tmp_path / "fresh"
    train(tiny_config(**{**FAST, "train.epochs": 1, "log.run_dir": str(fresh)}))
    assert not in_use(fresh)  # a finished training lets go of its folder
    with held(fresh):  # and taking it needs no wait
        assert in_use(fresh)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_a_damaged_checkpoint_file_gives_one_line_errors(tmp_path, trained, capsys, name, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "last" / name)
    for args in (["evaluate", "--run", str(run), "--checkpoint", "last", "--device", "cpu"], ["train", "--resume", str(run)]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        named = CKPT_FILES if name == "checksums.json" else (name,)  # a damaged manifest disagrees with a file
        assert len(err) == 1 and err[0].startswith("fuxi-mme: error: corrupt checkpoint:") and any(n in err[0] for n in named), err
    assert records(run) == records(trained)  # a refused resume wrote nothing
    if name == "model.safetensors" and damage is flip:
        assert main(["evaluate", "--run", str(run), "--checkpoint", "best", "--device", "cpu"]) == 0  # the other checkpoint serves


def test_every_single_bit_flip_of_the_manifest_is_refused(tmp_path):
    import torch

    model = torch.nn.Linear(2, 2)
    folder = tmp_path / "last"
    ck.save_checkpoint(folder, model, {"epoch": 1}, torch.optim.AdamW(model.parameters()), {"torch": torch.get_rng_state()})
    good = (folder / "checksums.json").read_bytes()
    for pos in range(len(good)):
        for bit in range(8):
            flip(folder / "checksums.json", pos, bit)
            with pytest.raises(ck.CheckpointError, match="corrupt checkpoint"):
                ck.verify_checkpoint(folder)
            flip(folder / "checksums.json", pos, bit)
    assert (folder / "checksums.json").read_bytes() == good
    ck.load_weights(folder, model)


def test_a_lost_manifest_is_refused_and_a_missing_last_falls_back_to_last_old(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = run / "checkpoints" / "last"
    (last / "checksums.json").unlink()
    with pytest.raises(ck.CheckpointError, match="checksums.json is missing"):
        ck.load_state(last)
    shutil.copy(trained / "checkpoints" / "last" / "checksums.json", last)
    os.rename(last, last.with_name("last.old"))
    _, _, model = load_trained(run, "last", "cpu")  # serving and recommend load through here
    assert model is not None


# ---------------------------------------------------------------- damaged caches

DATA = ["data", "info", "demo", "--set", "data.demo_users=100"]


def cache_folder(cfg) -> Path:
    return Path(load_dataset(cfg).cache_dir)


def cache_files() -> list[str]:
    from fuxi_mme.config import DataConfig

    folder = cache_folder(DataConfig(name="demo", demo_users=100))
    return sorted(p.name for p in folder.iterdir())


def test_the_cache_writes_the_expected_files(tmp_path):
    assert cache_files() == ["checksums.json", "items.parquet", "meta.json", "sequences.npz", "titles.parquet", "users.parquet"]


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", ["checksums.json", "items.parquet", "meta.json", "sequences.npz", "titles.parquet", "users.parquet"])
def test_a_damaged_cache_file_is_rebuilt_and_replaced(tmp_path, caplog, capsys, name, damage):
    from fuxi_mme.config import DataConfig

    cfg = DataConfig(name="demo", demo_users=100)
    good = load_dataset(cfg)
    folder = Path(good.cache_dir)
    damage(folder / name)
    caplog.clear()
    assert main(DATA) == 0
    assert "users 100" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "rebuilding" in warnings[0]
    verify_manifest(folder, required=True)  # replaced on disk, not only rebuilt in memory
    caplog.clear()
    again = load_dataset(cfg)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    for k in ("offsets", "items", "timestamps", "item_raw", "user_raw"):
        np.testing.assert_array_equal(getattr(again, k), getattr(good, k))
    assert again.item_titles == good.item_titles and again.stats == good.stats
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left


def test_rebuild_replaces_the_cache_even_when_it_reads(tmp_path, capsys):
    from fuxi_mme.config import DataConfig

    folder = cache_folder(DataConfig(name="demo", demo_users=100))
    meta = json.loads((folder / "meta.json").read_text())
    meta["stats"]["note"] = "stale"
    (folder / "meta.json").write_text(json.dumps(meta))  # readable but not what a build writes
    assert main(["data", "prepare", *DATA[2:], "--rebuild"]) == 0
    assert "stale" not in (folder / "meta.json").read_text()
    verify_manifest(folder, required=True)


def test_a_sized_file_of_the_wrong_length_is_refused_and_a_same_length_change_is_not_checked(tmp_path):
    """Files recorded by size only (arrays too large to hash at every read): a truncated or
    extended one is refused with one line; hashed files keep their sha256 check."""
    from fuxi_mme.utils.integrity import IntegrityError, write_manifest

    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "items.int32").write_bytes(b"\0" * 64)
    write_manifest(tmp_path, ["meta.json"], sized=["items.int32"])
    verify_manifest(tmp_path, required=True)
    (tmp_path / "items.int32").write_bytes(b"\1" * 64)  # same size: by design not detected here
    verify_manifest(tmp_path, required=True)
    (tmp_path / "items.int32").write_bytes(b"\0" * 60)
    with pytest.raises(IntegrityError, match=r"items.int32 is missing or not the 64 bytes recorded"):
        verify_manifest(tmp_path)
    (tmp_path / "items.int32").write_bytes(b"\0" * 64)
    (tmp_path / "meta.json").write_text("{ }")
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        verify_manifest(tmp_path)


# ---------------------------------------------------------------- background writes


def test_background_writer_keeps_the_submitted_state_and_the_order(tmp_path):
    """Training changes the weights and the optimizer in place right after a submit: what is
    written is what was submitted; two saves of one tag land in order."""
    import threading

    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gate = threading.Event()
    ck_hook = lambda s, folder: gate.wait(10) if s == "begin" else None  # noqa: E731 - the write waits for the mutation
    writer = ck.CheckpointWriter()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    try:
        ck._fault_hook = ck_hook
        writer.submit(tmp_path / "last", model, {"epoch": 1}, opt)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        opt.state[model.weight]["exp_avg"].add_(1.0)
        gate.set()
        writer.wait()
    finally:
        ck._fault_hook = None
    state, tensors = ck.load_state(tmp_path / "last")
    assert state["epoch"] == 1
    weights = ck.read_weights(tmp_path / "last", torch.nn.Linear(3, 2), torch.device("cpu"))
    assert all(torch.equal(weights[k], before[k]) for k in before)
    assert torch.equal(ck.optimizer_state(state, tensors)["state"][0]["exp_avg"], moments)
    writer.submit(tmp_path / "last", model, {"epoch": 2}, opt)
    writer.close()
    assert ck.load_state(tmp_path / "last")[0]["epoch"] == 2


def test_background_writer_raises_a_failed_write_at_the_next_wait(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(ck, "_fault_hook", kill_hook("after-model", "last", save=1))
    writer = ck.CheckpointWriter()
    writer.submit(tmp_path / "last", torch.nn.Linear(2, 2), {"epoch": 1})
    with pytest.raises(Killed):
        writer.wait()
    writer.close()  # nothing pending any more
