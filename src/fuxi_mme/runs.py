"""The run folder: where ``fuxi-mme train`` writes a run and where evaluate, recommend, serve,
export and the experiments read it.

``<run>/``
* ``config.json``: the fully resolved :class:`~fuxi_mme.config.Config`;
* ``run.json``: commit, library versions, device, dataset statistics, notes, start time;
* ``metrics.jsonl``: the per-epoch records (``train``, ``valid``, ``test_curve``, ``test``);
* ``metrics.json``: the final record;
* ``checkpoints/best``, ``checkpoints/last``: safetensors checkpoints (``train/checkpoint.py``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .data import find_run_source, load_dataset
from .data.noise import evaluation_view, training_view
from .data.prepared import PreparedDataset, file_fingerprint, source_changed
from .data.splits import eval_arrays
from .eval.evaluator import evaluate_run_split, model_scorer, popularity_scorer, resolve_history
from .models import build_model
from .models.common import SequenceModel
from .train.checkpoint import load_weights
from .utils.runinfo import atomic_write_json
from .utils.runtime import autocast_dtype, resolve_device, train_device

log = logging.getLogger("fuxi_mme")


class Run:
    """One run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: Config) -> Run:
        """A new run folder (``log.run_dir``, default ``runs/<time>-<preset>``); refuses one that
        already holds a run."""
        p = Path(cfg.log.run_dir) if cfg.log.run_dir else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset}"
        if (p / "metrics.json").exists() or (p / "checkpoints").exists():
            raise FileExistsError(f"run directory {p} already holds a run; pick another --run-dir or continue it with --resume {p}")
        p.mkdir(parents=True, exist_ok=True)
        return cls(p)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        run = cls(path)
        if run._file("config.json") is None:
            raise FileNotFoundError(f"{run.path} is not a run directory (no config.json); pass the folder `fuxi-mme train` wrote")
        return run

    def _file(self, name: str) -> Any:
        """The JSON of the run's ``name``: the loose file, or the copy an experiment suite packed
        into its ``runs.jsonl`` (the checkpoints stay in the folder); None if neither."""
        from .experiments.store import run_file

        return run_file(self.path, name)

    @property
    def metrics_log(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def config(self) -> Config:
        return config_from_dict(self._file("config.json"))

    def info(self) -> dict[str, Any] | None:
        """``run.json`` (loose or packed), or None."""
        return self._file("run.json")

    def write_config(self, cfg: Config) -> None:
        atomic_write_json(self.path / "config.json", cfg.to_dict())

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.path / "run.json", info)

    def write_metrics(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.path / "metrics.json", result)

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.path / "metrics.json").read_text())

    def checkpoint(self, which: str = "auto") -> Path:
        """The folder of checkpoint ``which``; ``auto``: the best checkpoint when the run kept one
        (also when a kill left only ``best.old``), else the last."""
        kept = [t for t in ("best", "last") if (self.checkpoints / t).exists() or (self.checkpoints / f"{t}.old").exists()]
        if which == "auto":
            which = "best" if "best" in kept else "last"
        if which not in ("best", "last"):
            raise ValueError(f"--checkpoint {which!r}: use best, last or auto")
        if which not in kept:
            why = f"; it kept {' and '.join(kept)}: use --checkpoint {kept[0]}" if kept else "; it did not finish an epoch"
            raise FileNotFoundError(f"{self.path} has no {which} checkpoint{why}")
        return self.checkpoints / which


def adapt_to_dataset(cfg: Config, ds: PreparedDataset) -> list[str]:
    """Settings the data forces: no timestamps -> temporal channel off."""
    notes = []
    if not ds.has_timestamps and cfg.model.use_temporal:
        cfg.model.use_temporal = False
        notes.append(f"{ds.name} has no timestamps: the temporal attention channel is disabled (model.use_temporal=false)")
    return notes


def load_run(run_dir: str | Path) -> Config:
    """The resolved config of a run folder."""
    return Run.open(run_dir).config()


def load_trained(run_dir: str | Path, checkpoint: str = "auto", device: str = "auto") -> tuple[Config, PreparedDataset, SequenceModel | None]:
    """(cfg, dataset, model) of a finished or interrupted run, weights loaded safely (None for
    the popularity baseline, which has no model)."""
    run = Run.open(run_dir)
    cfg = run.config()
    cfg.train.device = device
    dev = train_device(cfg.train)
    find_run_source(cfg.data)
    ds = load_dataset(cfg.data)
    _warn_if_source_changed(cfg, run.info())
    adapt_to_dataset(cfg, ds)
    if cfg.model.name == "popularity":
        return cfg, ds, None
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(dev)
    load_weights(run.checkpoint(checkpoint), model, dev)
    model.eval()
    return cfg, ds, model


def _warn_if_source_changed(cfg: Config, info: dict[str, Any] | None) -> None:
    """Own data whose file is not the one the run trained on (``run.json``'s ``source``: another
    size or modification time): said, since the metrics and recommendations are then of other data."""
    if not cfg.data.path or not Path(cfg.data.path).exists():
        return
    if source_changed(info, file_fingerprint(cfg.data.path)):
        log.warning(
            "%s: %s is not the data this run trained on (its size or modification time changed since): its results are of the changed data",
            cfg.data.name,
            cfg.data.path,
        )


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "auto", device: str = "auto") -> dict[str, Any]:
    """Metrics of a trained run's checkpoint on ``split``, as training computed them."""
    cfg, ds, model = load_trained(run_dir, checkpoint, device)
    dev = resolve_device(cfg.train.device)
    amp = autocast_dtype(cfg.train.amp)  # the precision of the run's own evaluations
    scorer = popularity_scorer(training_view(ds, cfg.data, cfg.train.seed), cfg.data.protocol, dev) if model is None else model_scorer(model, amp)
    ds = evaluation_view(ds, cfg.data, cfg.train.seed)  # clean unless data.noise.eval (docs/training.md#robustness-protocols)
    arrs = eval_arrays(ds, cfg.data.protocol, split, cfg.data.max_len)
    history, why = resolve_history(cfg.eval.history, ds, cfg.data.protocol)
    m = evaluate_run_split(scorer, arrs, ds, cfg, split, history, dev)
    return {
        "protocol": cfg.data.protocol,
        "split": split,
        "checkpoint": checkpoint,
        "model": cfg.model.name,
        "dataset": ds.name,
        "eval_history": {"mode": history, "why": why},
        split: m,
    }
