"""Export a trained run for serving without this library's Python code paths.

``fuxi-mme export --run RUN_DIR --out DIR`` writes:

* ``user_encoder.pt``: TorchScript (``torch.jit.trace``) of the user encoder,
  ``(ids, ts, query_ts, lengths) -> (B, D)`` user vectors at each row's last position. Inputs
  are int64 (B, max_len) left-aligned, zero-padded; any batch size works;
* ``items.safetensors``: the item matrix ``items`` (I+1, D), row 0 = padding;
* ``meta.json``: max_len, whether the model reads timestamps, the raw item id of every row,
  titles, and how to score (``user @ items.T``, mask row 0 and seen items, top-k).

Load it with ``torch.jit.load`` and ``safetensors.torch.load_file``; :func:`load_exported`
does both and returns a scoring function used by the tests to check that the exported model
gives the same top-k as the eager one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.moe import MoE
from ..utils.runinfo import atomic_write_text
from .recommender import Recommender


class UserEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        user = self.model(ids, ts, query_ts)
        return user[torch.arange(ids.shape[0], device=ids.device), lengths - 1].float()


def export_run(rec: Recommender, out: str | Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = rec.model.eval().cpu()
    for m in model.modules():
        if isinstance(m, MoE):
            m.backend = "loop"  # data-independent control flow: traces for every batch
    enc = UserEncoder(model).eval()
    L = rec.max_len
    g = torch.Generator().manual_seed(0)
    B = 3
    ids = torch.randint(1, rec.num_items + 1, (B, L), generator=g)
    ts = torch.cumsum(torch.randint(0, 10_000, (B, L), generator=g), 1)
    lengths = torch.tensor([L, max(1, L // 2), 1])
    with torch.no_grad():
        traced = torch.jit.trace(enc, (ids, ts, ts, lengths), check_trace=False)
    tmp = out / ".user_encoder.pt.tmp"
    traced.save(str(tmp))
    tmp.replace(out / "user_encoder.pt")
    items = rec.items_ID.detach().float().cpu().contiguous()
    save_file({"items": items}, str(out / ".items.tmp"))
    (out / ".items.tmp").replace(out / "items.safetensors")
    raw = [v.item() if isinstance(v, np.generic) else v for v in rec.item_raw.tolist()]
    meta = {
        "format": "fuxi-mme-export-1",
        "model": rec.cfg.model.name,
        "preset": rec.cfg.preset,
        "dataset": rec.ds.name,
        "max_len": L,
        "uses_timestamps": rec.uses_time,
        "items": rec.num_items,
        "item_raw_ids": raw,
        "titles": rec.titles,
        "scoring": "scores = user_encoder(ids, ts, query_ts, lengths) @ items.T; scores[:, 0] = -inf; mask seen items; top-k",
        "inputs": "int64 (B, max_len), left-aligned, zero-padded; query_ts[i] = ts[i+1], query_ts[len-1] = time of the next interaction",
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, default=str))
    return {"dir": str(out), "files": ["user_encoder.pt", "items.safetensors", "meta.json"]}


def load_exported(folder: str | Path):
    """(encoder, items, meta) of an export."""
    from safetensors.torch import load_file

    folder = Path(folder)
    enc = torch.jit.load(str(folder / "user_encoder.pt"), map_location="cpu")
    items = load_file(str(folder / "items.safetensors"))["items"]
    meta = json.loads((folder / "meta.json").read_text())
    return enc, items, meta
