import io
import os
import zipfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("FUXI_MME_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own dataset cache, so tests never see each other's files."""
    monkeypatch.setenv("FUXI_MME_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("FUXI_MME_OFFLINE", "1")  # tests never reach the internet; download tests use 127.0.0.1
    yield


def shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (benchmark data lives in ../shared/data)")
    return p


TINY = {
    "data.demo_users": 200,
    "data.max_len": 20,
    "model.dim": 16,
    "model.qk_dim": 8,
    "model.v_dim": 8,
    "model.num_heads": 2,
    "model.ffn_dim": 16,
    "model.dropout": 0.0,
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.num_negatives": 16,
    "train.device": "cpu",
    "log.progress": False,
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tiny_config(model: str = "fuxi-alpha", **over):
    """A small, fast configuration on a small demo dataset."""
    from fuxi_mme.config import apply_overrides
    from fuxi_mme.presets import build_preset, preset_name

    cfg = build_preset(preset_name("demo", model, "base"))
    base = dict(TINY)
    base.update(over)
    apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])
    return cfg


def epoch_losses_and_first_grads(tr, grad_accum: int = 1):
    """One epoch of ``Trainer.forward_backward`` + optimizer steps: every batch's loss, and the
    gradients after the first batch (used to compare the CUDA-graph step with the eager one)."""
    import numpy as np

    order, B = tr._epoch_order(0), tr.cfg.train.batch_size
    losses, grads = [], None
    for i in range(-(-len(order) // B)):
        loss, _ = tr.forward_backward(order[i * B : (i + 1) * B])
        losses.append(float(loss.detach()))
        if grads is None:
            grads = {k: p.grad.detach().float().cpu().clone() for k, p in tr.model.named_parameters() if p.grad is not None}
        if (i + 1) % grad_accum == 0:
            tr.opt.step()
            tr.zero_grad()
    return np.array(losses), grads


def zip_bytes(members: dict[str, str | bytes]) -> bytes:
    """A zip archive in memory holding ``members`` (name -> text or bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()
