"""Export a trained run for serving without the run folder or the training code.

``fuxi-mme export RUN OUT`` writes to OUT:

* ``user_encoder.pt2``: a ``torch.export`` program of the user encoder,
  ``(ids_BN, ts_BN, query_ts_BN) -> user_BD``, the user vector at each row's last real
  position. Inputs are int64, left-aligned and zero-padded (id 0 = padding); B and N are
  dynamic, 1 <= N <= max_len. Load it with ``torch.export.load(path).module()``;
* ``user_encoder.aoti.pt2`` (optional): the same program compiled ahead of time by
  AOTInductor for this machine's CPU (``torch._inductor.aoti_load_package``);
* ``user_encoder.onnx`` (optional, with the ``onnx`` extra): the same program as ONNX, checked
  against onnxruntime when it is installed;
* ``items.safetensors``: the item matrix ``items`` (I+1, D), row 0 = padding;
* ``items.json``: the raw item id (and title) of every row;
* ``export.json``: the manifest (model, dataset, max_len, shapes, files, how to score);
* ``checksums.json``: the sha256 of every file above (:mod:`fuxi_mme.utils.integrity`).

Scoring: ``scores = user_BD @ items.T``, then row 0 and the history's items set to -inf, top-k.
:func:`load_exported` verifies the checksums and returns a :class:`Recommender` on the exported
program, which ``fuxi-mme serve --exported OUT`` serves (CPU).

Legend: B histories, N history length (padded), D vector width, I items.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.integrity import MANIFEST, verify_manifest, write_manifest
from ..utils.runinfo import atomic_write_text
from .recommender import Recommender

log = logging.getLogger(__name__)

FORMAT = "fuxi-mme-export-2"
PROGRAM, AOTI, ONNX = "user_encoder.pt2", "user_encoder.aoti.pt2", "user_encoder.onnx"
ITEMS, ITEM_IDS, META = "items.safetensors", "items.json", "export.json"
RUNTIMES = ("program", "aoti")
# The execution paths the program is captured from: the PyTorch attention reference (Triton
# kernels do not export) and the dense MoE back end (no data-dependent shapes, no host sync;
# the batched back end sizes a buffer from the routing). Same weights, same results.
EXPORT_OVERRIDES = ("model.attention=reference", "model.moe.backend=dense")


class UserEncoder(torch.nn.Module):
    """(ids_BN, ts_BN, query_ts_BN) -> user_BD fp32, at each row's last non-padding position."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids_BN: torch.Tensor, ts_BN: torch.Tensor, query_ts_BN: torch.Tensor) -> torch.Tensor:
        last_B = (ids_BN != 0).sum(1) - 1
        user_BND = self.model(ids_BN, ts_BN, query_ts_BN)
        return user_BND[torch.arange(ids_BN.shape[0], device=ids_BN.device), last_B].float()


def example_inputs(num_items: int, n: int, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(ids, ts, query_ts), each (b, n): left-aligned histories of lengths n, about n/2 and 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, num_items + 1, (b, n), generator=g)
    for r, length in enumerate([n, max(1, n // 2), 1][:b]):
        ids[r, length:] = 0
    ts = torch.cumsum(torch.randint(0, 10_000, (b, n), generator=g), 1) * (ids != 0)
    return ids, ts, ts.roll(-1, 1)


def export_program(model: torch.nn.Module, num_items: int, max_len: int) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of ``UserEncoder(model)`` with dynamic B and N <= max_len."""
    enc = UserEncoder(model).eval()
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=1, max=max_len)
    dims = ({0: batch, 1: length},) * 3
    with torch.no_grad(), warnings.catch_warnings():
        # MoE layers keep routing statistics (a training-side output) as plain attributes;
        # export reports them, and they are not part of the program's output
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        return torch.export.export(enc, example_inputs(num_items, max(2, max_len)), dynamic_shapes=dims)


def export_run(rec: Recommender, out: str | Path, aoti: bool = True, onnx: bool = True) -> dict[str, Any]:
    """Write the export of ``rec``'s model to ``out`` (see the module docstring); returns the
    folder and the files written."""
    from safetensors.torch import save_file

    from ..config import apply_overrides
    from ..models import build_model

    if rec.uses_behavior:
        raise ValueError(
            "this run's model reads behaviours (model.use_behavior=true), which the exported program's inputs do not carry yet; "
            "serve it with `fuxi-mme serve` instead"
        )
    out = _prepare_out(Path(out))
    cfg = apply_overrides(copy.deepcopy(rec.cfg), list(EXPORT_OVERRIDES))
    model = build_model(cfg.model, rec.num_items, rec.max_len)
    model.load_state_dict(rec.model.state_dict())
    model.eval().requires_grad_(False)
    ep = export_program(model, rec.num_items, rec.max_len)
    torch.export.save(ep, str(out / f".tmp-{PROGRAM}"))
    (out / f".tmp-{PROGRAM}").replace(out / PROGRAM)
    files = [PROGRAM]
    check = [example_inputs(rec.num_items, n, b, seed=1) for b, n in ((1, 1), (2, max(1, rec.max_len // 3)), (5, rec.max_len))]
    want = [ep.module()(*x) for x in check]
    if aoti:
        files += _aoti_package(ep, out, check, want)
    else:
        log.info("AOTInductor package skipped (--no-aoti)")
    if onnx:
        files += _onnx_file(ep, out, check, want)
    items_ID = rec.items_ID.detach().float().cpu().contiguous()
    save_file({"items": items_ID}, str(out / f".{ITEMS}.tmp"))
    (out / f".{ITEMS}.tmp").replace(out / ITEMS)
    raw = [v.item() if isinstance(v, np.generic) else v for v in rec.item_raw.tolist()]
    atomic_write_text(out / ITEM_IDS, json.dumps({"raw_ids": raw, "titles": rec.titles}, default=str))
    saved = copy.deepcopy(rec.cfg)
    saved.eval.history = rec.history_mode  # resolved ("auto" reads the dataset, which serving has not)
    meta = {
        "format": FORMAT,
        "model": rec.cfg.model.name,
        "preset": rec.cfg.preset,
        "dataset": rec.ds.name,
        "max_len": rec.max_len,
        "uses_timestamps": rec.uses_time,
        "items": rec.num_items,
        "dim": int(items_ID.shape[1]),
        "files": {
            "program": PROGRAM,
            "aoti": AOTI if AOTI in files else None,
            "onnx": ONNX if ONNX in files else None,
            "items": ITEMS,
            "item_ids": ITEM_IDS,
        },
        "inputs": "ids, ts, query_ts: int64 (B, N), 1 <= N <= max_len, left-aligned, zero-padded; "
        "query_ts[i] = ts[i+1], at the last item the time of the next interaction",
        "outputs": "user: float32 (B, D), the user vector at each row's last item",
        "scoring": "scores = user @ items.T (items: (I+1, D)); scores[:, 0] = -inf; history items = -inf; top-k; row r is item_ids raw_ids[r]",
        "export_overrides": list(EXPORT_OVERRIDES),
        "config": dataclasses.asdict(saved),
        "torch": torch.__version__,
    }
    atomic_write_text(out / META, json.dumps(meta, indent=1, default=str))
    files += [ITEMS, ITEM_IDS, META]
    write_manifest(out, files)
    return {"dir": str(out), "files": [*files, MANIFEST]}


def _prepare_out(out: Path) -> Path:
    """``out``, created; a folder that holds anything but an earlier export, finished or stopped
    half-way (only the export's own files and temporaries), is refused (so a run folder is never
    written into), and an earlier export's files are removed."""
    ours = {PROGRAM, AOTI, ONNX, ONNX + ".data", ITEMS, ITEM_IDS, META, MANIFEST}

    def own(name: str) -> bool:  # a file of an export, or one of its temporaries (".tmp-x", ".x.tmp", ".x.<random>")
        return name in ours or (name.startswith(".") and any(name.lstrip(".").removeprefix("tmp-").startswith(o) for o in ours))

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()):
        if not (out / META).is_file() and not all(own(p.name) and p.is_file() for p in out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no earlier export ({META}); give a new or empty folder")
        for p in out.iterdir():
            if own(p.name):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _agrees(run: Callable, check: list, want: list) -> bool:
    return all(torch.allclose(torch.as_tensor(run(*x)), w, rtol=1e-4, atol=1e-5) for x, w in zip(check, want))


def _aoti_package(ep, out: Path, check: list, want: list) -> list[str]:
    """The AOTInductor package, or nothing (with a log line) where it cannot be built or disagrees."""
    tmp = out / f".tmp-{AOTI}"
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
            runner = torch._inductor.aoti_load_package(str(tmp))
            ok = _agrees(runner, check, want)
    except Exception as exc:  # noqa: BLE001 - optional: no C++ compiler, unsupported op, ...
        log.info("AOTInductor package skipped: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        tmp.unlink(missing_ok=True)
        return []
    if not ok:
        log.warning("AOTInductor package skipped: its outputs differ from the exported program's")
        tmp.unlink()
        return []
    tmp.replace(out / AOTI)
    log.info("wrote the AOTInductor package %s", out / AOTI)
    return [AOTI]


def _onnx_file(ep, out: Path, check: list, want: list) -> list[str]:
    """The ONNX file when the ``onnx`` extra is installed (checked with onnxruntime if present)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        log.info("ONNX skipped: pip install 'fuxi-mme[onnx]' to write it")
        return []
    path = out / ONNX
    names = ["ids", "ts", "query_ts"]
    try:
        torch.onnx.export(ep, check[0], str(path), dynamo=True, input_names=names, output_names=["user"], external_data=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - optional artefact
        log.warning("ONNX skipped: the export failed (%s: %s)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        path.unlink(missing_ok=True)
        return []
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("wrote %s (not checked: onnxruntime is not installed)", path)
        return [ONNX]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if not _agrees(lambda *x: sess.run(None, {n: t.numpy() for n, t in zip(names, x)})[0], check, want):
        log.warning("ONNX skipped: onnxruntime's outputs differ from the exported program's")
        path.unlink()
        return []
    log.info("wrote %s (checked against onnxruntime)", path)
    return [ONNX]


# ---------------------------------------------------------------------------- loading


@dataclass
class Catalogue:
    """What a :class:`Recommender` reads from a dataset, for an exported model (no users)."""

    name: str
    num_items: int
    has_timestamps: bool
    item_raw: np.ndarray  # (I+1,) raw id of every row, row 0 = padding
    item_titles: list[str] | None
    user_raw: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))


class ExportedModel(torch.nn.Module):
    """The :class:`~fuxi_mme.models.SequenceModel` interface over an exported user encoder:
    ``forward`` gives (B, N, D) with every position holding the row's user vector (the encoder
    already picked the last item), ``item_vectors`` the saved item matrix."""

    def __init__(self, encoder: Callable, items_ID: torch.Tensor):
        super().__init__()
        self.encoder, self.items_ID = encoder, items_ID

    def train(self, mode: bool = True) -> ExportedModel:
        return self  # the program was captured in eval mode and has no other (it refuses train())

    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids, ts, query_ts)[:, None, :].expand(-1, ids.shape[1], -1)

    def item_vectors(self) -> torch.Tensor:
        return self.items_ID


def load_exported(folder: str | Path, runtime: str = "program", unknown_items: str = "report") -> Recommender:
    """A CPU :class:`Recommender` on the export in ``folder`` (checksums verified first).
    ``runtime``: "program" (the ``torch.export`` program) or "aoti" (the AOTInductor package)."""
    from safetensors.torch import load_file

    from ..config import config_from_dict

    folder = Path(folder)
    if not (folder / META).is_file():
        raise FileNotFoundError(f"{folder} is not an export (no {META}); create one with `fuxi-mme export RUN {folder}`")
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder} was exported in format {meta.get('format')!r}, this version reads {FORMAT!r}; export the run again")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; use one of {', '.join(RUNTIMES)}")
    verify_manifest(folder, required=True)
    encoder: Callable[..., torch.Tensor]
    if runtime == "aoti":
        if not meta["files"]["aoti"]:
            raise FileNotFoundError(f"{folder} has no AOTInductor package; export again without --no-aoti (needs a C++ compiler), or use the program")
        encoder = torch._inductor.aoti_load_package(str(folder / AOTI))
    else:
        encoder = torch.export.load(str(folder / PROGRAM)).module()
    items_ID = load_file(str(folder / ITEMS))["items"]
    ids = json.loads((folder / ITEM_IDS).read_text())
    raw = ids["raw_ids"]
    item_raw = np.array(raw, dtype=np.int64) if all(isinstance(v, int) for v in raw) else np.array(raw, dtype=object)
    cfg = config_from_dict(meta["config"])
    cfg.train.amp = "none"  # the program is fp32
    cat = Catalogue(meta["dataset"], int(meta["items"]), bool(meta["uses_timestamps"]), item_raw, ids["titles"])
    return Recommender(cfg, cat, ExportedModel(encoder, items_ID), "cpu", unknown_items, run_dir=None)
