"""``train(cfg)``: prepare the data, build the model, train, evaluate and write the run folder
(``fuxi_mme/runs.py`` describes it). Under ``torchrun`` every process calls it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config, validate
from ..data import check_expected, load_dataset
from ..data.noise import evaluation_view, training_view
from ..data.prepared import PreparedDataset
from ..data.splits import eval_arrays
from ..eval.evaluator import evaluate_split, popularity_scorer, resolve_history
from ..models import build_model
from ..runs import Run, adapt_to_dataset
from ..utils.runinfo import run_info
from ..utils.runtime import seed_everything, setup_device
from . import distributed as D
from .loop import Trainer

log = logging.getLogger("fuxi_mme")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "item_emb" in n)
    return {"total": total, "item_embeddings": emb, "non_embedding": total - emb}


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics record.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this; see ``distributed.py``.
    """
    validate(cfg)
    dinfo = D.from_env()
    device = setup_device(cfg.train.device, dinfo.local_rank if dinfo.enabled else None, cfg.train.num_threads, cfg.train.tf32)
    if dinfo.enabled:
        D.init(dinfo, device, cfg.train.dist_timeout)
        if not dinfo.main:
            logging.getLogger("fuxi_mme").setLevel(logging.WARNING)  # rank 0 speaks for all
    try:
        out = _train(cfg, resume, dinfo, device)
        # no rank tears the group down while a peer may still be in a collective (hardening: a
        # two-process gloo test once aborted rank 0 at its end, 1 in 11 runs; cause not confirmed)
        D.barrier(dinfo)
        return out
    except Exception as exc:  # noqa: BLE001 - re-raised, clearer when a peer rank died
        err = D.explain(exc, dinfo, cfg.train.dist_timeout)
        if err is exc:
            raise
        raise err from exc
    finally:
        D.shutdown()


def _train(cfg: Config, resume, dinfo: D.DistInfo, device: torch.device) -> dict[str, Any]:
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    ds = load_dataset(cfg.data) if dinfo.main else None
    D.barrier(dinfo)  # rank 0 prepares the cache first; the others then read it
    if ds is None:
        ds = load_dataset(cfg.data)
    if dinfo.main:
        for w in check_expected(ds):
            log.warning(w)
    notes = adapt_to_dataset(cfg, ds)
    for n in notes:
        log.info(n)
    run_dir = None
    if dinfo.main:
        run_dir = Path(resume) if resume else Run.create(cfg).path
    run_dir = Path(D.broadcast_object(str(run_dir) if run_dir else None, dinfo))
    run = Run(run_dir)
    info = {**run_info(device), "dataset": ds.stats, "notes": notes, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if dinfo.enabled:
        info["distributed"] = {"world_size": dinfo.world, "backend": "nccl" if device.type == "cuda" else "gloo"}
    if not resume and dinfo.main:
        run.write_config(cfg)
        run.write_info(info)
    log.info("run directory: %s", run_dir)

    if cfg.model.name == "popularity":
        return _popularity(cfg, ds, device, run_dir, write=dinfo.main)

    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(device)
    params = count_parameters(model)
    log.info("%s: %s parameters (%s non-embedding)", cfg.model.name, f"{params['total']:,}", f"{params['non_embedding']:,}")
    trainer = Trainer(cfg, ds, model, device, run_dir, progress=cfg.log.progress, dist_info=dinfo)
    if resume:
        trainer.restore(run.checkpoint("last"))
        log.info("resumed from epoch %d (step %d)", trainer.state.epoch, trainer.state.step)
    result = trainer.fit()
    result.update(model=cfg.model.name, preset=cfg.preset, dataset=ds.name, parameters=params, run_dir=str(run_dir))
    if dinfo.enabled:
        result["world_size"] = dinfo.world
    if dinfo.main:
        run.write_metrics(result)
    return result


def _popularity(cfg: Config, ds: PreparedDataset, device: torch.device, run_dir: Path, write: bool = True) -> dict[str, Any]:
    scorer = popularity_scorer(training_view(ds, cfg.data, cfg.train.seed), cfg.data.protocol, device)  # counts of the (perturbed) training parts
    ds = evaluation_view(ds, cfg.data, cfg.train.seed)
    history, why = resolve_history(cfg.eval.history, ds, cfg.data.protocol)
    log.info(why)
    out: dict[str, Any] = {
        "protocol": cfg.data.protocol,
        "split": "test",
        "model": "popularity",
        "preset": cfg.preset,
        "dataset": ds.name,
        "run_dir": str(run_dir),
        "eval_history": {"mode": history, "why": why},
    }
    for split in ["valid", "test"] if cfg.data.protocol == "loo-val" else ["test"]:
        arrs = eval_arrays(ds, cfg.data.protocol, split, cfg.data.max_len)
        m = evaluate_split(
            scorer,
            arrs,
            ds,
            split=split,
            history=history,
            ks=cfg.eval.ks,
            batch_size=cfg.eval.batch_size,
            device=device,
            protocol=cfg.data.protocol,
            beyond=cfg.eval.beyond,
        )
        out["test" if split == "test" else "valid_best"] = m
    if write:
        Run(run_dir).write_metrics(out)
    return out
