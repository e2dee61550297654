"""Planning a suite: the job list, each job's config, its relative cost and the GPU it runs on.

Each job is a normal ``fuxi-mme train`` run in its own folder
(``<root>/<suite>/<dataset>/<variant>/seed<k>``). Its config is built here with the library's
own functions (:func:`fuxi_mme.presets.build_preset`, :func:`fuxi_mme.config.apply_overrides`),
so a finished run can be checked against what the plan asks for.

Placeholders in a suite's overrides, filled from the dataset's FuXi-alpha base preset:
``{qk_full}`` (its head width), ``{qk_half}``, ``{qk_quarter}``, ``{ffn_base}`` (its FFN
multiplier) and ``{qk_d<w>}`` (the head width at embedding width ``w``: w / heads).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, apply_overrides, validate
from ..presets import build_defaults, build_preset, preset_name
from ..shapes import DATASETS
from .own import OwnData, own_from_runs
from .store import RUN_DEPTH, has_run_file, run_file, stored_runs, variant_runs
from .suites import Suite, Variant

# Where each dataset's files are, under the data root (plus the official archives' folder names
# for the datasets that are not there). A dataset whose folder is absent is read from the cache's
# raw folder or downloaded, as `fuxi-mme train` does.
DATA_FOLDERS = {
    "ml-100k": "ml-100k",
    "ml-1m": "ml-1m",
    "ml-1m-ts70": "ml-1m",
    "ml-20m": "ml-20m",
    "kuairand-pure": "KuaiRand-Pure",
    "kuairand-1k": "KuaiRand-1K",
    "amazon-beauty": "amazon_s3rec",
    "amazon-sports": "amazon_s3rec",
    "amazon-toys": "amazon_s3rec",
}
NO_DOWNLOAD = {"ml-1m-ts70"}  # built from the ML-1M files; there is no download of its own
WIDTHS = (128, 256)  # the embedding widths with a {qk_d<w>} placeholder

# Config fields that choose how a run executes (where its files are, kernels, graphs, compile,
# threads), not what it trains: a finished run may differ from the plan in these and still count.
EXECUTION_FIELDS = (
    "data.path",
    "data.data_dir",
    "model.attention",
    "model.moe.backend",
    "train.device",
    "train.tf32",
    "train.compile",
    "train.cuda_graphs",
    "train.length_chunks",
    "train.num_threads",
    "train.dist_timeout",
    "train.deterministic",
    "eval.batch_size",
    "eval.ranking",
    "log.",
)
# What a run taken from another suite may differ in (``reusable_run``): where files are, the
# device, threads, timeouts and logging, never a kernel, compile or graph path (the precision
# suite compares exactly those).
REUSE_IGNORED = ("data.path", "data.data_dir", "train.device", "train.num_threads", "train.dist_timeout", "eval.batch_size", "eval.ranking", "log.")


def _ignored(key: str, fields: tuple[str, ...]) -> bool:
    """``key`` is one of ``fields``: the same key, or under one ending in a dot (``log.``);
    ``model.attention`` is not ``model.attention_norm``."""
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields)


@dataclass
class Job:
    dataset: str
    variant: str
    seed: int
    args: list[str]
    run_dir: Path
    gpu: str | None = None
    invalid: str | None = None  # why this variant cannot run on this dataset (never started)
    planned: dict[str, Any] | None = None  # the config the run trains (to tell a finished run made with other settings)
    rerun: str | None = None  # --rerun: "all" or "without-beyond" (finished runs to train again)
    own: OwnData | None = None  # the user's file this job trains on (experiment --source), else None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(
    planned: dict[str, Any], saved: dict[str, Any], ignored: tuple[str, ...] = EXECUTION_FIELDS, no_timestamps: bool = True
) -> list[str]:
    """What a finished run's saved ``config.json`` trained differently from the planned config,
    as ``key: saved -> planned`` (empty: the run is what the plan asks for). Keys the run did
    not record (older runs) count as their defaults; ``ignored`` fields (:data:`EXECUTION_FIELDS`)
    do not count. ``no_timestamps``: the run may have switched the temporal channel off itself
    (its data has no timestamps)."""
    defaults, want, have = _flat(Config().to_dict()), _flat(planned), _flat(saved)
    trains = want.get("model.name") != "popularity"  # popularity counts items: no model or training settings
    out = []
    if want.get("model.name") != have.get("model.name", defaults.get("model.name")):
        out.append(f"model.name: {have.get('model.name')!r} -> {want.get('model.name')!r}")
    if want.get("data.path") and "data.path" in have and have["data.path"] != want["data.path"]:
        # the plan names a file (own data, experiment --source): a run of another file of the same name is another dataset
        out.append(f"data.path: {have['data.path']!r} -> {want['data.path']!r}")
    for key, value in want.items():
        if key in ("preset", "shape", "model.name") or _ignored(key, ignored) or (not trains and key.startswith(("model.", "train."))):
            continue
        old = have.get(key, defaults.get(key))
        if key == "model.use_temporal" and old is False and value is True and no_timestamps:
            continue  # switched off by the run because its data has no timestamps
        if old != value:
            out.append(f"{key}: {old!r} -> {value!r}")
    return out


RERUN = ("all", "without-beyond")


def stale_changes(job: Job) -> list[str]:
    """How a finished run's settings differ from the plan (empty: not finished, or as planned),
    and why ``--rerun`` asks for it again."""
    saved = run_file(job.run_dir, "config.json")
    if job.planned is None or saved is None or not has_run_file(job.run_dir, "metrics.json"):
        return []
    changes = config_changes(job.planned, saved)
    if job.own is not None and (why := job.own.changed_since(run_file(job.run_dir, "run.json"))):
        changes.append(why)
    if job.rerun == "all":
        changes.append("--rerun all")
    elif job.rerun == "without-beyond" and "beyond" not in ((run_file(job.run_dir, "metrics.json") or {}).get("test") or {}):
        changes.append("--rerun without-beyond: made before the beyond-accuracy metrics")
    return changes


def is_done(job: Job) -> bool:
    """A finished run trained with the settings the plan asks for."""
    return has_run_file(job.run_dir, "metrics.json") and not stale_changes(job)


def planned_config(preset: str, sets: list[str], base: Config | None = None) -> tuple[Config | None, str | None]:
    """The config a run of ``preset`` (or of ``base``, own data's shape defaults) with ``sets``
    trains, or the configuration error it would stop with (e.g. M=4 with a width of 50)."""
    try:
        cfg = apply_overrides(base if base is not None else build_preset(preset), sets)
        validate(cfg)
    except ConfigError as e:
        return None, str(e)
    return cfg, None


def placeholders(dataset: str, own: OwnData | None = None) -> dict[str, Any]:
    """The values of the suite files' ``{...}`` placeholders on ``dataset`` (own data: from its shape's defaults)."""
    base = (build_defaults(own.shape, "fuxi-alpha", "base", dataset) if own else build_preset(preset_name(dataset, "fuxi-alpha", "base"))).model
    return {
        "qk_full": base.qk_dim,
        "qk_half": max(1, base.qk_dim // 2),
        "qk_quarter": max(1, base.qk_dim // 4),
        "ffn_base": base.ffn_multiply,
        **{f"qk_d{w}": max(1, w // base.num_heads) for w in WIDTHS},
    }


def data_args(dataset: str, data_root: Path | None, check_data: bool) -> list[str]:
    """``--data-path`` of ``dataset``'s folder under ``data_root`` when it is there."""
    folder = data_root / DATA_FOLDERS[dataset] if data_root is not None and dataset in DATA_FOLDERS else None
    if folder is not None and folder.exists():
        return ["--data-path", str(folder)]
    if dataset in NO_DOWNLOAD and check_data:
        raise ValueError(f"dataset {dataset} needs --data-root (the folder holding {DATA_FOLDERS[dataset]}/)")
    return []


def run_folder(root: Path, suite: str, dataset: str, variant: str, seed: int) -> Path:
    safe = variant.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus-").replace("=", "-")
    return root / suite / dataset / safe / f"seed{seed}"


def make_job(
    suite: Suite, name: str, v: Variant, dataset: str, seed: int, root: Path, data: list[str], extra: list[str], own: OwnData | None = None
) -> Job:
    """One run of variant ``name`` on ``dataset``: its CLI arguments and its planned config (own
    data: its file, name and measured shape instead of a preset)."""
    fmt = placeholders(dataset, own)
    preset, protocol = preset_name(dataset, v.model, v.size), suite.protocol_of(v)
    run_dir = run_folder(root, suite.name, dataset, name, seed)
    sets = [o.format(**fmt) for o in [*suite.sets, *suite.model_sets.get(v.model, []), *v.sets, *extra]]
    what, base = ["--preset", preset], None
    if own is not None:  # the file, named and with its measured shape's defaults, instead of a preset
        what = ["--source", own.path, "--name", dataset, "--shape", own.shape, "--model", v.model, "--size", v.size]
        base = build_defaults(own.shape, v.model, v.size, dataset)
        base.data.path = own.path
    args = ["train", *what, "--seed", str(seed), "--protocol", protocol, "--run-dir", str(run_dir), "--no-progress", *data]
    for o in sets:
        args += ["--set", o]
    cfg, bad = planned_config(preset, [f"train.seed={seed}", f"data.protocol={protocol}", *sets], base)
    return Job(dataset, name, seed, args, run_dir, invalid=bad, planned=cfg.to_dict() if cfg is not None else None, own=own)


def plan(
    suite: Suite,
    root: Path,
    data_root: Path | None,
    extra: list[str],
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    check_data: bool = True,
    variants: list[str] | None = None,
    rerun: str | None = None,
    own: dict[str, OwnData] | None = None,
) -> list[Job]:
    """Every job of ``suite`` (its datasets, or ``datasets``; its seeds, or ``seeds``), ``extra``
    overrides applied last; ``variants`` keeps only those rows; ``rerun`` (:data:`RERUN`) marks
    which finished runs train again; ``own``: the datasets that are a user's files (:func:`own_data`)."""
    own = own or {}
    jobs = []
    for ds in datasets or suite.datasets:
        data = [] if ds in own else data_args(ds, data_root, check_data)
        for name, v in suite.variants_for(ds).items():
            if variants and name not in variants:
                continue
            jobs += [make_job(suite, name, v, ds, seed, root, data, extra, own.get(ds)) for seed in seeds or suite.seeds_of(v)]
    for j in jobs:
        j.rerun = rerun
    return jobs


def reusable_run(job: Job, root: Path) -> Path | None:
    """A finished run of another suite under ``root`` that trained exactly what ``job`` plans
    (the same dataset and seed, no setting of :func:`config_changes` different), with the
    metrics every table reads (beyond-accuracy and history buckets in its test record): its
    folder, else None. The robustness suite's clean rows are the main suite's runs, say."""
    if job.planned is None or not root.is_dir():
        return None
    own = job.run_dir.parents[2]
    for suite_dir in sorted(p for p in root.iterdir() if p.is_dir() and p != own):
        keys = set(stored_runs(suite_dir)) | {p.parent.relative_to(suite_dir).as_posix() for p in suite_dir.glob("*/*/*/metrics.json")}
        for key in sorted(keys):
            ds, _, seed = key.split("/")
            if ds != job.dataset or seed != f"seed{job.seed}":
                continue
            src = suite_dir / key
            metrics, saved, info = run_file(src, "metrics.json"), run_file(src, "config.json"), run_file(src, "run.json")
            test = (metrics or {}).get("test") or {}
            recorded = Path(str((metrics or {}).get("run_dir", ""))).parts[-(RUN_DEPTH + 1) :]
            copied = "reused_from" in (info or {}) or (len(recorded) == RUN_DEPTH + 1 and recorded != src.parts[-(RUN_DEPTH + 1) :])
            if saved is None or info is None or copied or "beyond" not in test or "buckets" not in test:
                continue  # a copy (new, or older: its metrics.json names its source) is passed over: its original is a candidate
            no_timestamps = ((info.get("dataset") or {}).get("has_timestamps")) is False
            if job.own is not None and job.own.changed_since(info):
                continue  # trained on another version of the file
            if not config_changes(job.planned, saved, REUSE_IGNORED, no_timestamps):
                return src
    return None


def aggregation_jobs(
    suite: Suite,
    root: Path,
    data_root: Path | None,
    extra: list[str],
    datasets: list[str] | None = None,
    variants: list[str] | None = None,
    own: dict[str, OwnData] | None = None,
) -> list[Job]:
    """The jobs ``--aggregate-only`` tabulates: those of ``plan`` (the suite's datasets, or
    ``datasets``) and, without ``datasets``, the variants that have runs on other datasets (a
    command given ``--datasets`` or ``--source``; own data is read back from its runs' configs),
    so the tables show every finished run; on those other datasets a variant's seeds count as
    planned only where the variant has started."""
    own = dict(own or {})
    jobs = plan(suite, root, data_root, extra, datasets, check_data=False, variants=variants, own=own)
    if datasets is not None:
        return jobs
    suite_dir = root / suite.name
    if not suite_dir.is_dir():
        return jobs
    seed = re.compile(r"seed\d+")  # a run folder (not a seed<k>.stale one kept beside a rerun)
    stored = {key.rsplit("/", 1)[0] for key in stored_runs(suite_dir) if seed.fullmatch(key.rsplit("/", 1)[-1])}
    loose = {f"{d.parent.parent.name}/{d.parent.name}" for d in suite_dir.glob("*/*/seed*") if d.is_dir() and seed.fullmatch(d.name)}
    started = stored | loose  # "<dataset>/<variant folder>"
    others = sorted({key.split("/", 1)[0] for key in started} - set(suite.datasets))
    for ds in others:
        if ds not in DATASETS and ds not in own:
            found = own_from_runs(ds, [d for k in sorted(started) if k.split("/", 1)[0] == ds for d in variant_runs(suite_dir / k)])
            if found is not None:
                own[ds] = found
    others = [ds for ds in others if ds in DATASETS or ds in own]
    if not others:
        return jobs
    more = plan(suite, root, data_root, extra, others, check_data=False, variants=variants, own=own)
    return jobs + [j for j in more if f"{j.dataset}/{j.run_dir.parent.name}" in started]


# Rough relative cost of a run, to start the long ones first (longest-first keeps the tail of a
# grid short). Only the order depends on it, never a result.
DATASET_COST = {
    "ml-20m": 100.0,
    "kuairand-1k": 30.0,
    "kuairand-pure": 10.0,
    "ml-1m": 10.0,
    "ml-1m-ts70": 7.0,
    "amazon-sports": 3.0,
    "amazon-beauty": 1.5,
    "amazon-toys": 1.5,
    "ml-100k": 1.0,
    "demo": 0.1,
}
MODEL_COST = {"popularity": 0.01, "sasrec": 0.5, "hstu": 1.0, "llama": 1.0, "fuxi-alpha": 1.0, "fuxi-mme": 2.0}


def job_family(job: Job) -> Hashable:
    """The runs expected to need the same GPU memory and host cores as ``job``: the same dataset,
    model, sequence length, sparsity protocol and batch (its noise and seed aside; inserted items
    lengthen rows only up to the same length). Execution switches (compile, graphs, length
    chunks, evaluation batch) are not in it: no suite varies them alone. Without a planned
    config: its own variant."""
    if job.planned is None:
        return (job.dataset, job.variant)
    p = job.planned
    data = p.get("data") or {}
    # the batch width: the length, cut by the sparsity protocol's last-k (a "last 20 events" run's rows are 21 wide)
    shape = {"model": p.get("model"), "max_len": data.get("max_len"), "sparsity": data.get("sparsity")}
    shape["train"] = {k: (p.get("train") or {}).get(k) for k in ("batch_size", "loss", "num_negatives", "amp", "grad_accum")}
    return (job.dataset, json.dumps(shape, sort_keys=True, default=str))


def job_cost(job: Job) -> float:
    """Relative cost from the planned config: dataset x model family x 4 for a large preset,
    scaled by its depth and experts against the preset's own."""
    if job.planned is None:
        return 0.0
    m = job.planned["model"]
    if job.own is not None:  # own data: its shape's defaults (the preset name is <name>-<model>-<size>)
        preset = build_defaults(job.own.shape, m["name"], "large" if job.planned["preset"].endswith("-large") else "base", job.dataset)
    else:
        preset = build_preset(job.planned["preset"])
    p = preset.model
    cost = DATASET_COST.get(job.dataset, 5.0) * MODEL_COST.get(m["name"], 1.0) * (4.0 if preset.preset.endswith("-large") else 1.0)
    cost *= m["num_layers"] / p.num_layers
    return cost * (1 + m["moe"]["num_experts"] / 16) / (1 + p.moe.num_experts / 16)


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() != ""]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA: CPU jobs
        return []


class GpuSlots:
    """Hands each starting job the visible GPU with the fewest running jobs."""

    def __init__(self, gpus: list[str]):
        self.load = {g: 0 for g in gpus}
        self.lock = threading.Lock()

    def take(self) -> str | None:
        with self.lock:
            if not self.load:
                return None
            g = min(self.load, key=lambda k: self.load[k])
            self.load[g] += 1
            return g

    def give(self, g: str | None) -> None:
        if g is not None:
            with self.lock:
                self.load[g] -= 1
