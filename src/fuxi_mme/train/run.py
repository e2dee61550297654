"""``train(cfg)``: prepare the data, build the model, train, evaluate and write the run folder
(``fuxi_mme/runs.py`` describes it). Under ``torchrun`` every process calls it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config, validate
from ..data import check_expected, is_own_data, load_dataset
from ..data.noise import evaluation_view, training_view
from ..data.prepared import PreparedDataset, default_data_dir, file_fingerprint
from ..data.splits import eval_arrays
from ..eval.evaluator import evaluate_run_split, popularity_scorer, resolve_history
from ..models import build_model
from ..runs import Run, adapt_to_dataset
from ..utils.locks import held
from ..utils.procs import seconds_since_process_start
from ..utils.runinfo import process_cpu_seconds, run_info
from ..utils.runtime import compile_settings, seed_everything, train_device
from . import distributed as D
from .loop import Trainer

log = logging.getLogger("fuxi_mme")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "item_emb" in n)
    return {"total": total, "item_embeddings": emb, "non_embedding": total - emb}


def compile_shape_key(cfg: Config) -> str:
    """What fixes the shapes a run compiles (the model, the data and its length cap, the batch
    sizes, precision and device; not the seed, learning rate or epochs): runs that share it share
    Dynamo's record of which dimensions vary (``utils.runtime.compile_settings``)."""
    shape = {
        "model": dataclasses.asdict(cfg.model),
        "data": [cfg.data.name, str(cfg.data.path), cfg.data.max_len, cfg.data.behavior, cfg.data.target_behavior],
        "train": [cfg.train.batch_size, cfg.train.loss, cfg.train.num_negatives, cfg.train.amp, cfg.train.length_chunks, cfg.train.device],
        "eval": [cfg.eval.batch_size],
    }
    return hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics record.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this; see ``distributed.py``.
    """
    clock = _Phases(seconds_since_process_start())
    validate(cfg)
    dinfo = D.from_env()
    device = train_device(cfg.train, dinfo.local_rank if dinfo.enabled else None)
    if dinfo.enabled:
        D.init(dinfo, device, cfg.train.dist_timeout)
        if not dinfo.main:
            logging.getLogger("fuxi_mme").setLevel(logging.WARNING)  # rank 0 speaks for all
    try:
        with compile_settings(compile_shape_key(cfg), cfg.data.data_dir or default_data_dir()), contextlib.ExitStack() as claims:
            clock.lap("device")  # CUDA's start, the process group, the compile-cache folders
            out = _train(cfg, resume, dinfo, device, clock, claims)
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


def _train(
    cfg: Config,
    resume,
    dinfo: D.DistInfo,
    device: torch.device,
    clock: _Phases,
    claims: contextlib.ExitStack,
) -> dict[str, Any]:
    """The run itself; ``claims`` holds the run folder's lock until the caller's block ends
    (utils/locks.py: a second process writing into the folder stops, packing leaves it alone)."""
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
    run_dir, refused = None, None
    if dinfo.main:  # the folder, and its lock (held until the caller's block ends), or why not
        try:
            if resume and not Path(resume).is_dir():
                raise FileNotFoundError(f"--resume {resume}: no such run folder; pass the folder `fuxi-mme train` wrote")
            run_dir = Path(resume) if resume else Run.create(cfg).path
            claims.enter_context(held(run_dir, "training"))
        except (FileExistsError, FileNotFoundError) as exc:
            if not dinfo.enabled:
                raise
            refused = f"{type(exc).__name__}: {exc}"
    shared_dir, refused = D.broadcast_object((str(run_dir) if run_dir else None, refused), dinfo)
    if refused:  # every rank stops with rank 0's reason, none waits for a peer that left
        raise RuntimeError(refused)
    run_dir = Path(shared_dir)
    run = Run(run_dir)
    clock.lap("data")
    info = {**run_info(device), "dataset": ds.stats, "notes": notes, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cfg.data.path and is_own_data(cfg.data.name) and Path(cfg.data.path).exists():
        info["source"] = file_fingerprint(cfg.data.path)  # own data: which version (experiment, evaluate tell a changed one)
    if dinfo.enabled:
        info["distributed"] = {"world_size": dinfo.world, "backend": "nccl" if device.type == "cuda" else "gloo"}
    if not resume and dinfo.main:
        run.write_config(cfg)
        run.write_info(info)
    elif dinfo.main and run.config().to_dict() != cfg.to_dict():  # resumed with more epochs or another device
        run.write_config(cfg)
    log.info("run directory: %s", run_dir)

    if cfg.model.name == "popularity":
        return _popularity(cfg, ds, device, run_dir, write=dinfo.main)

    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(device)
    params = count_parameters(model)
    log.info("%s: %s parameters (%s non-embedding)", cfg.model.name, f"{params['total']:,}", f"{params['non_embedding']:,}")
    clock.lap("model")
    trainer = Trainer(cfg, ds, model, device, run_dir, progress=cfg.log.progress, dist_info=dinfo)
    if resume:
        trainer.restore(run.checkpoint("last"))
        log.info("resumed from epoch %d (step %d)", trainer.state.epoch, trainer.state.step)
    clock.lap("trainer_setup")
    result = trainer.fit()
    clock.lap("fit")
    result.update(model=cfg.model.name, preset=cfg.preset, dataset=ds.name, parameters=params, run_dir=str(run_dir))
    if dinfo.enabled:
        result["world_size"] = dinfo.world
    if dinfo.main:
        run.write_metrics(result)
        clock.lap("write")
        if not resume:
            done = {"phases": clock.breakdown(run.metrics_log), "host_cpu_seconds": process_cpu_seconds()}
            if device.type == "cuda":  # the whole run's peak, evaluations included: what packing runs onto a GPU reads
                done["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            run.write_info({**info, **done})
    return result


class _Phases:
    """Wall seconds of a run's phases, for ``run.json`` (docs/performance.md#time-to-result):
    start-up before ``train`` (interpreter, imports), device (its set-up: CUDA's start, the
    process group, the compile settings), data, model, trainer setup, the first
    epoch (compilation and CUDA-graph capture happen in it), the later epochs, the evaluations
    and the writing of the results."""

    def __init__(self, started_s: float | None):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {} if started_s is None else {"start_up": round(started_s, 3)}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.t, 3)
        self.t = now

    def breakdown(self, metrics_log: Path) -> dict[str, Any]:
        epochs, evals = [], []
        for line in metrics_log.read_text().splitlines() if metrics_log.exists() else []:
            rec = json.loads(line)
            if rec.get("kind") == "train":
                epochs.append(float(rec.get("epoch_seconds", 0.0)))
            elif "eval_seconds" in rec:
                evals.append(float(rec["eval_seconds"]))
        out: dict[str, float | int | None] = dict(self.laps)
        fit = out.pop("fit", None)
        out.update(
            first_epoch=round(epochs[0], 3) if epochs else None,
            later_epochs=round(sum(epochs[1:]), 3),
            evaluations=round(sum(evals), 3),
            evaluation_count=len(evals),
            fit_other=round(fit - sum(epochs) - sum(evals), 3) if fit is not None else None,  # checkpoints, logging
        )
        out["total"] = round(sum(float(v) for k, v in out.items() if k != "evaluation_count" and isinstance(v, (int, float))), 3)
        return out


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
        m = evaluate_run_split(scorer, arrs, ds, cfg, split, history, device)
        out["test" if split == "test" else "valid_best"] = m
    if write:
        Run(run_dir).write_metrics(out)
    return out
