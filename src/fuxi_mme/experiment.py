"""Experiment suites: grids of (dataset, variant, seed) runs, resumable, run concurrently,
aggregated over seeds into a results JSON and a Markdown table.

Each job is a normal ``fuxi-mme train`` run in its own process and folder
(``<root>/<suite>/<dataset>/<variant>/seed<k>``); a job whose ``metrics.json`` exists is
skipped, so an interrupted suite continues where it stopped. Several small jobs share one GPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .utils.runinfo import atomic_write_json, atomic_write_text, git_commit

# Variant name -> (model family, overrides). "fuxi-mme" variants start from the fuxi-mme preset.
ABLATION = {
    "fuxi-alpha": ("fuxi-alpha", []),
    "+multi-embedding": ("fuxi-mme", ["model.moe.num_experts=0"]),
    "+moe": ("fuxi-mme", ["model.num_embeddings=1", "model.qk_dim={qk_full}", "model.v_dim={qk_full}"]),
    "fuxi-mme (full)": ("fuxi-mme", []),
}
SWEEP = {
    "default": ("fuxi-mme", []),
    "M=4": ("fuxi-mme", ["model.num_embeddings=4", "model.qk_dim={qk_quarter}", "model.v_dim={qk_quarter}"]),
    "E=8": ("fuxi-mme", ["model.moe.num_experts=8"]),
    "top-1": ("fuxi-mme", ["model.moe.top_k=1"]),
    "shared expert": ("fuxi-mme", ["model.moe.shared_expert=true"]),
    "placement=u": ("fuxi-mme", ["model.moe.placement=u"]),
    "placement=out": ("fuxi-mme", ["model.moe.placement=out"]),
    "per-stream decoders": ("fuxi-mme", ["model.shared_decoder=false"]),
    "combine=mean": ("fuxi-mme", ["model.combine=mean"]),
    "aux-free balance": ("fuxi-mme", ["model.moe.balance=aux_free"]),
}
BASELINES = {
    "popularity": ("popularity", []),
    "sasrec": ("sasrec", []),
    "hstu": ("hstu", []),
    "fuxi-alpha": ("fuxi-alpha", []),
    "fuxi-mme": ("fuxi-mme", []),
}
MOVIELENS = ("ml-100k", "ml-1m", "ml-1m-ts70", "ml-20m")
# Datasets with published paper-protocol figures (SPEC section 6): MovieLens and KuaiRand. On
# these the main suite adds the large sizes and the paper protocol.
PUBLISHED = (*MOVIELENS, "kuairand-pure", "kuairand-1k")
PUBLISHED_EXTRA = {
    **{f"{m} large": (m, [], "large") for m in ("sasrec", "hstu", "fuxi-alpha", "fuxi-mme")},
    **{f"{m} (paper)": (m, [], "base", "paper") for m in BASELINES},
}
# Amazon: the main suite trains with the full softmax (the Amazon presets' loss, chosen by the
# `loss` suite), adds the large sizes (d = 256, chosen by the `width` suite) and keeps SPEC's
# sampled softmax as extra rows for every base model.
AMAZON = ("amazon-beauty", "amazon-sports", "amazon-toys")
AMAZON_EXTRA = {
    **{f"{m} large": (m, [], "large") for m in ("sasrec", "hstu", "fuxi-alpha", "fuxi-mme")},  # d = 256 (presets.FUXI_DIMS)
    **{f"{m} (sampled loss)": (m, ["train.loss=sampled"]) for m in ("sasrec", "hstu", "fuxi-alpha", "fuxi-mme")},
}
# Precision: the fast path (bf16 autocast, fused Triton attention, CUDA graphs with the model
# compiled inside them, dense experts) against the fp32 reference path (PyTorch attention,
# eager, not compiled, loop experts), GPU only.
REFERENCE_PATH = ["train.amp=none", "model.attention=reference", "train.cuda_graphs=off", "train.compile=false", "model.moe.backend=loop"]
FAST_PATH = ["train.amp=bf16", "model.attention=fused", "train.cuda_graphs=on", "train.compile=auto", "model.moe.backend=dense"]
PRECISION = {f"{m} {name}": (m, path) for m in ("fuxi-alpha", "fuxi-mme") for name, path in (("fp32 reference", REFERENCE_PATH), ("bf16 fast", FAST_PATH))}
# The training loss on Amazon (SPEC fixes it for MovieLens only): SPEC's sampled softmax with K
# uniform negatives, and the full softmax over the catalogue, at two temperatures; chosen on
# the validation split (docs/models.md).
LOSSES = {
    "sampled K=128": ["train.loss=sampled"],
    "full": ["train.loss=full", "train.temperature=0.05"],
    "full t=0.1": ["train.loss=full", "train.temperature=0.1"],
}
LOSSES_MORE_K = {f"sampled K={k}": ["train.loss=sampled", f"train.num_negatives={k}"] for k in (512, 2048, 8192)}
LOSS = {f"{m} {name}": (m, sets) for m in ("fuxi-alpha", "fuxi-mme") for name, sets in LOSSES.items()}
LOSS_MORE_K = {f"{m} {name}": (m, sets) for m in ("fuxi-alpha", "fuxi-mme") for name, sets in LOSSES_MORE_K.items()}
# Capacity at equal embedding size: multi-embedding runs the shared decoder at width d / M, so
# by default its heads and experts shrink with it. These variants give capacity back without
# touching the item tables (the total embedding size stays d): heads at FuXi-alpha's per-head
# width, experts 4x as wide, one decoder per stream. Each dataset's own preset loss; chosen on
# validation (docs/models.md).
CAPACITY = {
    "first default": ("fuxi-mme", []),
    "full-width heads": ("fuxi-mme", ["model.qk_dim={qk_full}", "model.v_dim={qk_full}"]),
    "experts x4": ("fuxi-mme", ["model.ffn_multiply=4"]),
    "per-stream decoders": ("fuxi-mme", ["model.shared_decoder=false"]),
    "heads + experts x4": ("fuxi-mme", ["model.qk_dim={qk_full}", "model.v_dim={qk_full}", "model.ffn_multiply=4"]),
    "heads + experts x4 + per-stream": ("fuxi-mme", ["model.qk_dim={qk_full}", "model.v_dim={qk_full}", "model.ffn_multiply=4", "model.shared_decoder=false"]),
}
# Fuxi-MME on Amazon, from the defaults before it (two streams, heads at full width): depth, more
# streams, weight decay, dropout; 3 seeds, chosen on validation (docs/models.md: it chose M=8),
# each dataset with its preset's loss.
AMAZON_TUNE = {
    "M=2": ("fuxi-mme", []),
    "L=4": ("fuxi-mme", ["model.num_layers=4"]),
    "M=4": ("fuxi-mme", ["model.num_embeddings=4"]),
    "weight decay 0.05": ("fuxi-mme", ["train.weight_decay=0.05"]),
    "dropout 0.3": ("fuxi-mme", ["model.dropout=0.3"]),
    # uncompiled: on an H200 torch.compile of this step did not return in 170 s before MoE models
    # were compiled with persistent reductions off (c5b58e8; docs/models.md). Its runs were
    # made that way; train.compile is an execution setting, so it does not change what they train
    "L=4, M=4": ("fuxi-mme", ["model.num_layers=4", "model.num_embeddings=4", "train.compile=false"]),
    "M=8": ("fuxi-mme", ["model.num_embeddings=8"]),
}
# Embedding width at equal embedding size: d for SASRec, FuXi-alpha and Fuxi-MME (each with its
# preset's decoder), the heads' width growing with d (d / H per head, as FuXi-alpha's presets do
# from ML-1M to ML-20M) and SASRec's FFN at d. Multi-embedding is meant to pay off as the tables
# widen (SPEC section 4), so this is where its advantage should show, if it has one.
WIDTHS = (128, 256)


def _width(w: int) -> list[str]:
    """A FuXi-family model at embedding width ``w``, heads of w / H (``{qk_d<w>}`` in plan)."""
    return [f"model.dim={w}", f"model.qk_dim={{qk_d{w}}}", f"model.v_dim={{qk_d{w}}}"]


WIDTH = {
    **{f"{m} d=base": (m, []) for m in ("sasrec", "fuxi-alpha", "fuxi-mme")},
    **{f"sasrec d={w}": ("sasrec", [f"model.dim={w}", f"model.ffn_dim={w}"]) for w in WIDTHS},
    **{f"{m} d={w}": (m, _width(w)) for m in ("fuxi-alpha", "fuxi-mme") for w in WIDTHS},
}
# Amazon only: Fuxi-MME at d = 256 with four streams of width 64 instead of eight of 32
WIDTH_AMAZON = {"fuxi-mme d=256, M=4": ("fuxi-mme", [*_width(256), "model.num_embeddings=4"])}
# The semantic channel's normaliser N in phi(q k^T) / N (SPEC: the padded length, 50 on Amazon).
# Amazon sequences are short (about 7 items in training), so dividing by 50 makes the
# semantic channel small beside the positional one; N = 8 is about the mean length. At the base
# width and at d = 256 (the `width` suite's other rows are the SPEC-N runs).
NORM = {
    **{f"{m} N=8": (m, ["model.attention_norm=8"]) for m in ("fuxi-alpha", "fuxi-mme")},
    **{f"{m} d=256, N=8": (m, [*_width(256), "model.attention_norm=8"]) for m in ("fuxi-alpha", "fuxi-mme")},
}
# Amazon Sports, the one Amazon set where Fuxi-MME large missed the published figure (SASRec+SS
# .0314; SPEC section 6): one option changed at a time from the large preset as it was (dropout
# 0.5, pinned by the suite), FuXi-alpha large with the options both models have; 3 seeds,
# chosen on validation (docs/models.md). Its two unchanged rows were the main suite's large
# runs then (the same configs).
SPORTS_OPTIONS = {
    "no temporal": ["model.use_temporal=false"],
    "dropout 0.4": ["model.dropout=0.4"],
    "dropout 0.6": ["model.dropout=0.6"],
    "lr 2e-3": ["train.lr=0.002"],
    "L=3": ["model.num_layers=3"],
}
SPORTS = {
    "fuxi-alpha large": ("fuxi-alpha", [], "large"),
    **{f"fuxi-alpha large, {k}": ("fuxi-alpha", SPORTS_OPTIONS[k], "large") for k in ("no temporal", "dropout 0.6")},
    "fuxi-mme large": ("fuxi-mme", [], "large"),
    **{f"fuxi-mme large, {k}": ("fuxi-mme", sets, "large") for k, sets in SPORTS_OPTIONS.items()},
    "fuxi-mme large, experts x4": ("fuxi-mme", ["model.ffn_multiply=4"], "large"),
    "fuxi-mme large, per-stream decoders": ("fuxi-mme", ["model.shared_decoder=false"], "large"),
}
# Dropout of the large Amazon models (d = 256): the Amazon shapes' 0.5 (chosen at the base
# width), 0.6 and 0.7, for the two models the comparison is about; 3 seeds, chosen on
# validation (docs/models.md). Pinned, so the rows stay what they were whatever the presets say.
DROPOUTS = (0.5, 0.6, 0.7)
# FuXi-alpha and Fuxi-MME at all three; SASRec and HSTU large at 0.5 and 0.6, measured after that
# choice: HSTU large took 0.6 too, SASRec large kept 0.5 (presets.LARGE_DROPOUT)
DROPOUT = {f"{m} large, dropout {p}": (m, [f"model.dropout={p}"], "large") for m in ("fuxi-alpha", "fuxi-mme", "sasrec", "hstu")
           for p in (DROPOUTS if m.startswith("fuxi") else DROPOUTS[:2])}
# Softmax temperature of the large Amazon models (logits = cosine / T): SPEC's 0.05 against 0.035,
# 0.07 and 0.1 for FuXi-alpha and Fuxi-MME; 0.07 and 0.1 for HSTU and SASRec (0.035 was below
# 0.05 for both FuXi models on all three sets). Each family at its preset's large dropout
# (pinned by the suite's model_sets: 0.6, SASRec 0.5); 3 seeds, chosen on validation
# (docs/models.md). The loss suite compared 0.05 with 0.1 at the base width only. The T 0.05 rows
# are the dropout suite's runs of the same configs.
TEMPERATURES = (0.035, 0.05, 0.07, 0.1)
TEMPERATURE = {f"{m} large, T {t}": (m, [f"train.temperature={t}"], "large") for m in ("fuxi-alpha", "fuxi-mme", "hstu", "sasrec")
               for t in (TEMPERATURES if m.startswith("fuxi") else TEMPERATURES[1:])}
# The first Fuxi-MME defaults (before the capacity suite): heads and experts at the decoder's
# width d / M, one decoder shared by the streams. The suites measured around them pin them, so
# their runs stay what they were (fuxi-mme variants only; see Suite.model_sets). The widths are
# the base size's: these suites run base sizes only.
FIRST_MME = ["model.num_embeddings=2", "model.qk_dim={qk_half}", "model.v_dim={qk_half}", "model.ffn_multiply={ffn_base}", "model.shared_decoder=true"]
# Scaling on ML-1M-ts70: depth for FuXi-alpha and Fuxi-MME, experts for Fuxi-MME and for
# FuXi-alpha + MoE. The first series ran at Fuxi-MME's first defaults (pinned, so their runs stay
# what they were); the "shipped" series repeats depth and experts with the ML-1M preset's decoder
# (full-width heads, experts 4x as wide, one decoder per stream). Its L=2 and E=4 are the main
# suite's Fuxi-MME base config.
SCALING = {
    **{f"fuxi-alpha L={n}": ("fuxi-alpha", [f"model.num_layers={n}"]) for n in (2, 4, 8)},
    **{f"fuxi-mme L={n}": ("fuxi-mme", [*FIRST_MME, f"model.num_layers={n}"]) for n in (2, 4, 8)},
    **{f"fuxi-mme E={e}": ("fuxi-mme", [*FIRST_MME, f"model.moe.num_experts={e}", f"model.moe.top_k={min(2, e)}"]) for e in (1, 4, 8, 16)},
    **{f"fuxi-alpha+moe E={e}": ("fuxi-mme", [*FIRST_MME, "model.num_embeddings=1", "model.qk_dim={qk_full}", "model.v_dim={qk_full}", f"model.moe.num_experts={e}",
                                               f"model.moe.top_k={min(2, e)}"]) for e in (1, 4, 8, 16)},
    **{f"fuxi-mme shipped L={n}": ("fuxi-mme", [f"model.num_layers={n}"]) for n in (2, 4, 8)},
    **{f"fuxi-mme shipped E={e}": ("fuxi-mme", [f"model.moe.num_experts={e}", f"model.moe.top_k={min(2, e)}"]) for e in (1, 4, 8, 16)},
}
# The suites that compare model options keep SPEC's sampled loss on every dataset, Amazon too.
SPEC_LOSS = ["train.loss=sampled"]


@dataclass
class Suite:
    """A grid of runs. A variant is ``(model, overrides[, size[, protocol]])``; ``extra``
    adds variants for some datasets only (e.g. large sizes on MovieLens)."""

    name: str
    datasets: list[str]
    variants: dict[str, tuple]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    protocol: str = "loo-val"
    description: str = ""
    extra: dict[tuple[str, ...], dict[str, tuple]] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)  # overrides for every run, before the variant's own
    model_sets: dict[str, list[str]] = field(default_factory=dict)  # overrides for one model family's runs, after ``sets``
    model_seeds: dict[str, list[int]] = field(default_factory=dict)  # one model family's seeds, instead of ``seeds``

    def variants_for(self, dataset: str) -> dict[str, tuple]:
        out = dict(self.variants)
        for group, more in self.extra.items():
            if dataset in group:
                out.update(more)
        return out


SUITES = {
    "ablation": Suite("ablation", ["demo", "ml-100k", "amazon-beauty", "ml-1m-ts70"], ABLATION, description="FuXi-alpha; + multi-embedding only; + MoE only; full Fuxi-MME (SPEC section 4), SPEC's sampled loss", sets=SPEC_LOSS),
    "sweep": Suite("sweep", ["demo", "amazon-beauty", "ml-1m-ts70"], SWEEP, seeds=[0, 1], description="one Fuxi-MME option changed at a time from the first defaults (heads and experts at width d/M, one shared decoder), on validation, SPEC's sampled loss",
                   sets=SPEC_LOSS, model_sets={"fuxi-mme": FIRST_MME}),
    "main": Suite(
        "main",
        ["ml-1m-ts70", "ml-100k", "amazon-beauty", "amazon-sports", "amazon-toys"],
        BASELINES,
        description="all models (base and large; the paper protocol too on MovieLens, SPEC's sampled loss too on Amazon), loo-val everywhere; "
                    "5 seeds for FuXi-alpha and Fuxi-MME (the comparison the target is about), 3 for the others",
        extra={PUBLISHED: PUBLISHED_EXTRA, AMAZON: AMAZON_EXTRA},
        # three seeds left most of the Fuxi-MME / FuXi-alpha differences inside seed noise
        model_seeds={"fuxi-alpha": [0, 1, 2, 3, 4], "fuxi-mme": [0, 1, 2, 3, 4]},
    ),
    "scaling": Suite("scaling", ["ml-1m-ts70"], SCALING, description="test NDCG@10 against depth and number of experts, with parameters and training time; "
                     "Fuxi-MME at its first defaults (heads and experts at width d/M, one shared decoder) and, as \"fuxi-mme shipped\", with the ML-1M preset's decoder"),
    "precision": Suite("precision", ["ml-100k", "amazon-beauty"], PRECISION, description="the fast bf16 path (fused attention, CUDA graphs, compiled) against the fp32 reference path (GPU), SPEC's sampled loss; Fuxi-MME at its first defaults",
                       sets=SPEC_LOSS, model_sets={"fuxi-mme": FIRST_MME}),
    "capacity": Suite("capacity", ["ml-1m-ts70", "ml-100k", "amazon-beauty", "amazon-sports", "amazon-toys"], CAPACITY, seeds=[0, 1],
                      description="Fuxi-MME's decoder capacity at equal embedding size (head width, expert width, per-stream decoders) from its first defaults, on validation",
                      model_sets={"fuxi-mme": FIRST_MME}),
    "amazon": Suite("amazon", list(AMAZON), AMAZON_TUNE, description="Fuxi-MME on Amazon from two streams with full-width heads: depth, more streams, weight decay, dropout, on validation",
                    model_sets={"fuxi-mme": ["model.num_embeddings=2"]}),
    "width": Suite("width", ["amazon-beauty", "amazon-sports", "amazon-toys", "ml-1m-ts70"], WIDTH, extra={AMAZON: WIDTH_AMAZON},
                   description="embedding width d at equal embedding size: SASRec, FuXi-alpha and Fuxi-MME (their presets' decoders) at the base width, 128 and 256, on each dataset's preset loss"),
    "norm": Suite("norm", list(AMAZON), NORM, description="the semantic attention's normaliser N = 8 (about the mean Amazon training length) against SPEC's padded length 50 (the `width` suite's rows), FuXi-alpha and Fuxi-MME, at the base width and d = 256"),
    "sports": Suite("sports", ["amazon-sports"], SPORTS, description="Amazon Sports, where Fuxi-MME large missed the published figure: one option changed at a time "
                    "from the large preset as it was (dropout 0.5): temporal channel, dropout, learning rate, depth, expert width, per-stream decoders; FuXi-alpha large "
                    "with the options both have; on validation", sets=["model.dropout=0.5", "train.temperature=0.05"]),
    "dropout": Suite("dropout", list(AMAZON), DROPOUT, description="dropout of the large (d = 256) Amazon models, FuXi-alpha and Fuxi-MME: 0.5 (the Amazon shapes' value, "
                     "chosen at the base width), 0.6 and 0.7, on validation; SASRec and HSTU large at 0.5 and 0.6; SPEC's temperature 0.05 (pinned)", sets=["train.temperature=0.05"]),
    "temperature": Suite("temperature", list(AMAZON), TEMPERATURE, description="the softmax temperature of the large (d = 256) Amazon models: SPEC's 0.05 against 0.035, 0.07 and 0.1, "
                         "each at its large dropout (0.6; SASRec 0.5), on validation",
                         model_sets={"fuxi-alpha": ["model.dropout=0.6"], "fuxi-mme": ["model.dropout=0.6"], "hstu": ["model.dropout=0.6"], "sasrec": ["model.dropout=0.5"]}),
    "loss": Suite("loss", ["amazon-beauty", "amazon-toys"], LOSS, seeds=[0], description="the training loss on Amazon: sampled softmax with K negatives or the full softmax, on validation; Fuxi-MME at its first defaults",
                  model_sets={"fuxi-mme": FIRST_MME},
                  extra={("amazon-beauty",): LOSS_MORE_K}),
}

# Where each dataset's files are, under --data-root (the layout of ../shared/data, plus the
# official archives' folder names for the datasets that are not there). A dataset whose folder
# is absent is read from the cache's raw folder or downloaded, as `fuxi-mme train` does.
DATA_FOLDERS = {
    "ml-100k": "ml-100k", "ml-1m": "ml-1m", "ml-1m-ts70": "ml-1m", "ml-20m": "ml-20m",
    "kuairand-pure": "KuaiRand-Pure", "kuairand-1k": "KuaiRand-1K",
    "amazon-beauty": "amazon_s3rec", "amazon-sports": "amazon_s3rec", "amazon-toys": "amazon_s3rec",
}
NO_DOWNLOAD = {"ml-1m-ts70"}  # exists only as ../shared/data/ml-1m


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


# Config fields that choose how a run executes (where its files are, kernels, graphs, compile,
# threads), not what it trains: a finished run may differ from the plan in these and still count.
EXECUTION_FIELDS = ("data.path", "data.data_dir", "model.attention", "model.moe.backend", "train.device", "train.tf32", "train.compile",
                    "train.cuda_graphs", "train.length_chunks", "train.num_threads", "train.dist_timeout", "train.deterministic",
                    "eval.batch_size", "log.")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(planned: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """What a finished run's saved ``config.json`` trained differently from the planned config,
    as ``key: saved -> planned`` (empty: the run is what the plan asks for). Keys the run did
    not record (older runs) count as their defaults; :data:`EXECUTION_FIELDS` are ignored."""
    from .config import Config

    defaults, want, have = _flat(Config().to_dict()), _flat(planned), _flat(saved)
    trains = want.get("model.name") != "popularity"  # popularity counts items: no model or training settings
    out = []
    for key, value in want.items():
        if key == "preset" or key.startswith(EXECUTION_FIELDS) or (not trains and key.startswith(("model.", "train."))):
            continue
        old = have.get(key, defaults.get(key))
        if key == "model.use_temporal" and old is False and value is True:
            continue  # switched off by the run because its data has no timestamps
        if old != value:
            out.append(f"{key}: {old!r} -> {value!r}")
    return out


def _stale(job: Job) -> list[str]:
    """How a finished run's settings differ from the plan (empty: not finished, or as planned)."""
    f = job.run_dir / "config.json"
    if job.planned is None or not (job.run_dir / "metrics.json").exists() or not f.exists():
        return []
    return config_changes(job.planned, json.loads(f.read_text()))


def _done(job: Job) -> bool:
    """A finished run trained with the settings the plan asks for."""
    return (job.run_dir / "metrics.json").exists() and not _stale(job)


def _planned(preset: str, sets: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The config a run of ``preset`` with ``sets`` trains, or the configuration error it would
    stop with (e.g. M=4 with a width of 50)."""
    from .config import ConfigError, apply_overrides, validate
    from .presets import build_preset

    try:
        cfg = apply_overrides(build_preset(preset), sets)
        validate(cfg)
    except ConfigError as e:
        return None, str(e)
    return cfg.to_dict(), None


def plan(suite: Suite, root: Path, data_root: Path | None, extra: list[str], datasets: list[str] | None = None, seeds: list[int] | None = None,
         check_data: bool = True, variants: list[str] | None = None) -> list[Job]:
    from .presets import build_preset, preset_name

    jobs = []
    for ds in datasets or suite.datasets:
        base = build_preset(preset_name(ds, "fuxi-alpha", "base")).model
        fmt = {"qk_full": base.qk_dim, "qk_half": max(1, base.qk_dim // 2), "qk_quarter": max(1, base.qk_dim // 4), "ffn_base": base.ffn_multiply,
               **{f"qk_d{w}": max(1, w // base.num_heads) for w in WIDTHS}}
        data_args: list[str] = []
        folder = data_root / DATA_FOLDERS[ds] if data_root is not None and ds in DATA_FOLDERS else None
        if folder is not None and folder.exists():
            data_args = ["--data-path", str(folder)]
        elif ds in NO_DOWNLOAD and check_data:
            raise ValueError(f"dataset {ds} needs --data-root (the folder holding {DATA_FOLDERS[ds]}/)")
        for variant, spec in suite.variants_for(ds).items():
            if variants and variant not in variants:
                continue
            model, over = spec[0], spec[1]
            size = spec[2] if len(spec) > 2 else "base"
            protocol = spec[3] if len(spec) > 3 else suite.protocol
            for seed in seeds or suite.model_seeds.get(model, suite.seeds):
                safe = variant.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus-").replace("=", "-")
                run_dir = root / suite.name / ds / safe / f"seed{seed}"
                args = ["train", "--preset", preset_name(ds, model, size), "--seed", str(seed), "--protocol", protocol, "--run-dir", str(run_dir), "--no-progress", *data_args]
                sets = [o.format(**fmt) for o in [*suite.sets, *suite.model_sets.get(model, []), *over, *extra]]
                for o in sets:
                    args += ["--set", o]
                planned, bad = _planned(preset_name(ds, model, size), [f"train.seed={seed}", f"data.protocol={protocol}", *sets])
                jobs.append(Job(ds, variant, seed, args, run_dir, invalid=bad, planned=planned))
    return jobs


def _run(job: Job, env: dict[str, str]) -> tuple[Job, int, float]:
    import shutil

    changes = _stale(job)
    if (job.run_dir / "metrics.json").exists() and not changes:  # finished as planned
        return job, 0, 0.0
    if changes:  # finished with other settings: keep it beside the new run until the next one
        aside = job.run_dir.with_name(job.run_dir.name + ".stale")
        if aside.exists():
            shutil.rmtree(aside)
        job.run_dir.rename(aside)
        sys.stdout.write(f"{job.run_dir}: trained with other settings ({'; '.join(changes)}), moved to {aside.name} and run again\n")  # one write: threads do not interleave
        sys.stdout.flush()
    elif job.run_dir.exists():  # an interrupted job: start it again cleanly
        shutil.rmtree(job.run_dir)
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    if job.gpu is not None:
        env = {**env, "CUDA_VISIBLE_DEVICES": job.gpu}
    t0 = time.perf_counter()
    with open(job.run_dir.parent / f"{job.run_dir.name}.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "fuxi_mme", *job.args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return job, rc, time.perf_counter() - t0


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() != ""]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA: CPU jobs
        return []


# Rough relative cost of a run, to start the long ones first (longest-first keeps the tail of a
# grid short). Only the order depends on it, never a result.
DATASET_COST = {"ml-20m": 100.0, "kuairand-1k": 30.0, "kuairand-pure": 10.0, "ml-1m": 10.0, "ml-1m-ts70": 7.0,
                "amazon-sports": 3.0, "amazon-beauty": 1.5, "amazon-toys": 1.5, "ml-100k": 1.0, "demo": 0.1}
MODEL_COST = {"popularity": 0.01, "sasrec": 0.5, "hstu": 1.0, "llama": 1.0, "fuxi-alpha": 1.0, "fuxi-mme": 2.0}


def job_cost(job: Job) -> float:
    a = job.args
    preset = a[a.index("--preset") + 1]
    model = next((m for m in MODEL_COST if f"-{m}" in preset), "fuxi-alpha")
    cost = DATASET_COST.get(job.dataset, 5.0) * MODEL_COST[model] * (4.0 if preset.endswith("-large") else 1.0)
    for i, x in enumerate(a):
        if x == "--set" and a[i + 1].startswith("model.num_layers="):
            cost *= int(a[i + 1].split("=")[1]) / 2
        if x == "--set" and a[i + 1].startswith("model.moe.num_experts="):
            cost *= 1 + int(a[i + 1].split("=")[1]) / 16
    return cost


class _GpuSlots:
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


def run_suite(suite: Suite, root: Path, data_root: Path | None, jobs: int = 1, extra: list[str] | None = None, datasets: list[str] | None = None,
              seeds: list[int] | None = None, docs: Path | None = None, variants: list[str] | None = None) -> dict[str, Any]:
    """Run one suite's missing jobs; see :func:`run_suites`."""
    return run_suites([suite], root, data_root, jobs, extra, datasets, seeds, docs, variants)[0]


def run_suites(suites: list[Suite], root: Path, data_root: Path | None, jobs: int = 1, extra: list[str] | None = None,
               datasets: list[str] | None = None, seeds: list[int] | None = None, docs: Path | None = None,
               variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the missing jobs of one or more suites as one queue, ``jobs`` at a time, longest
    first, each started on the visible GPU with the fewest running jobs; then aggregate each
    suite. Finished runs (a ``metrics.json`` in their folder) are skipped, unless they trained with
    settings the plan no longer asks for (a changed preset default, say): those run again, the old
    folder kept as ``seed<k>.stale``."""
    todos = [plan(s, root, data_root, extra or [], datasets, seeds, variants=variants) for s in suites]
    names = {id(j): s.name for s, todo in zip(suites, todos) for j in todo}
    pending = [j for todo in todos for j in todo if j.invalid is None and not _done(j)]
    pending.sort(key=job_cost, reverse=True)
    slots = _GpuSlots(visible_gpus())
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(jobs, 1))))

    def start(job: Job) -> tuple[Job, int, float]:
        job.gpu = slots.take()
        try:
            return _run(job, env)
        finally:
            slots.give(job.gpu)

    failed: dict[str, list[str]] = {s.name: [] for s in suites}
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # each job reported as it ends, not in start order
        for fut in as_completed([pool.submit(start, j) for j in pending]):
            job, rc, dt = fut.result()
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {job.run_dir}.log)"
            print(f"[{names[id(job)]}] {job.dataset} / {job.variant} / seed {job.seed}: {status} {dt:.0f}s" + (f" (GPU {job.gpu})" if job.gpu else ""), flush=True)
            if rc:
                failed[names[id(job)]].append(str(job.run_dir))
    commit = git_commit()
    out = [aggregate(s, todo, root, failed[s.name], commit) for s, todo in zip(suites, todos)]
    if docs is not None:
        write_docs(root, docs)
    return out


def aggregate(suite: Suite, todo: list[Job], root: Path, failed: list[str], commit: str | None = None) -> dict[str, Any]:
    """Mean and std over seeds of every (dataset, variant) with results; ``<root>/<suite>.json``
    and ``.md``. ``commit``: the checkout's commit, read once before several suites are written
    (the first suite's files would otherwise make the tree look modified to the next)."""
    changes = {id(job): _stale(job) for job in todo}  # read each run's config once
    done = [job for job in todo if (job.run_dir / "metrics.json").exists() and not changes[id(job)]]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in done:
        rows.setdefault((job.dataset, job.variant), []).append(json.loads((job.run_dir / "metrics.json").read_text()))
    # where each run came from: its commit and device (run.json), counted per suite and per row
    origin: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for job in done:
        rj = job.run_dir / "run.json"
        if rj.exists():
            info = json.loads(rj.read_text())
            dev = info.get("device", {})
            origin.setdefault((job.dataset, job.variant), []).append((run_commit(info), str(dev.get("gpu") or dev.get("device", "?"))))
    every = [o for runs in origin.values() for o in runs]
    commits = {c: sum(1 for x, _ in every if x == c) for c in dict.fromkeys(c for c, _ in every)}
    devices = {d: sum(1 for _, x in every if x == d) for d in dict.fromkeys(d for _, d in every)}
    table = []
    for (ds, variant), runs in rows.items():
        entry: dict[str, Any] = {"dataset": ds, "variant": variant, "seeds": len(runs), "protocol": runs[0]["protocol"], "runs": [r["run_dir"] for r in runs],
                                 "devices": sorted({d for _, d in origin.get((ds, variant), [])})}
        for split in ("test", "valid_best"):
            if all(split in r for r in runs):
                for k in ("NDCG@10", "HR@10", "NDCG@50", "HR@50", "MRR"):
                    vals = np.array([r[split][k] for r in runs if k in r[split]])
                    if len(vals):
                        entry[f"{split}/{k}"] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        entry["epochs"] = [r.get("selected_epoch") for r in runs]
        secs = [_train_seconds(Path(r["run_dir"])) for r in runs]
        if all(x is not None for x in secs):
            entry["train_seconds"] = {"mean": float(np.mean(secs)), "std": float(np.std(secs, ddof=1)) if len(secs) > 1 else 0.0}
        params = runs[0].get("parameters")
        if params:
            entry["parameters"] = params
        table.append(entry)
    missing: dict[tuple[str, str], int] = {}
    invalid: dict[tuple[str, str], str] = {}
    stale: dict[tuple[str, str], list[str]] = {}
    for job in todo:
        if job.invalid is not None:
            invalid[(job.dataset, job.variant)] = job.invalid
        elif changes[id(job)]:
            stale.setdefault((job.dataset, job.variant), changes[id(job)])
        elif not (job.run_dir / "metrics.json").exists():
            missing[(job.dataset, job.variant)] = missing.get((job.dataset, job.variant), 0) + 1
    out = {"suite": suite.name, "description": suite.description, "commit": commit or git_commit(), "run_commits": commits, "devices": devices,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "failed": failed, "results": table,
           "missing": [{"dataset": d, "variant": v, "runs": n} for (d, v), n in missing.items()],
           "stale": [{"dataset": d, "variant": v, "changes": c} for (d, v), c in stale.items()],
           "not_applicable": [{"dataset": d, "variant": v, "why": w} for (d, v), w in invalid.items()]}
    atomic_write_json(root / f"{suite.name}.json", out)
    atomic_write_text(root / f"{suite.name}.md", markdown(out))
    return out


def run_commit(info: dict[str, Any]) -> str:
    """A run's commit from its ``run.json``. Runs that did not record one (launched on a machine
    without git before ``FUXI_MME_COMMIT`` existed) are labelled with the newest commit of this
    checkout before the run started, marked as such, when git can tell."""
    if info.get("commit"):
        return str(info["commit"])
    started = info.get("started")
    if started:
        try:
            out = subprocess.run(["git", "rev-list", "-1", f"--before={started}", "HEAD"], capture_output=True, text=True, timeout=10,
                                 cwd=Path(__file__).resolve().parent)
            if out.returncode == 0 and out.stdout.strip():
                return f"not recorded; newest earlier commit {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return "not recorded"


def _short_hashes(text: str) -> str:
    return re.sub(r"\b([0-9a-f]{10})[0-9a-f]{30}\b", r"\1", text)


def _train_seconds(run_dir: Path) -> float | None:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return None
    recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return float(sum(r.get("epoch_seconds", 0.0) for r in recs if r.get("kind") == "train"))


def short_gpu(devices: list[str]) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``; several joined by +."""
    out = []
    for d in devices:
        words = [w for w in d.replace("NVIDIA", "").split() if w]
        out.append(words[0] if words else d)
    return "+".join(dict.fromkeys(out)) or "-"


def markdown(res: dict[str, Any]) -> str:
    count = lambda d: ", ".join(f"{k} ({n})" for k, n in d.items()) or "-"  # noqa: E731
    lines = [f"### Suite `{res['suite']}`: {res['description']}", "",
             f"Aggregated at commit `{res['commit']}`, {res['time']}, from runs of commits {count({_short_hashes(c): n for c, n in res.get('run_commits', {}).items()})} "
             f"on {count(res.get('devices', {}))} (number of runs in parentheses; each run's folder names its own). Mean ± std over seeds; full ranking. "
             "Train s is wall time with several runs sharing a GPU, so it compares runs of one suite, not machines.", ""]
    lines.append("| dataset | variant | protocol | seeds | valid NDCG@10 | test NDCG@10 | test HR@10 | test MRR | params (non-emb.) | train s | GPU |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda e, k: f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" if k in e else "-"  # noqa: E731
    for e in res["results"]:
        p = e.get("parameters")
        params = f"{p['total']:,} ({p['non_embedding']:,})" if p else "-"
        ts = f"{e['train_seconds']['mean']:.0f}" if "train_seconds" in e else "-"
        lines.append(f"| {e['dataset']} | {e['variant']} | {e['protocol']} | {e['seeds']} | {f(e, 'valid_best/NDCG@10')} | {f(e, 'test/NDCG@10')} | {f(e, 'test/HR@10')} | {f(e, 'test/MRR')} | {params} | {ts} | {short_gpu(e.get('devices', []))} |")
    if res.get("failed"):
        lines += ["", "Failed runs: " + ", ".join(res["failed"])]
    if res.get("not_applicable"):
        lines += ["", "Not applicable (never run): " + "; ".join(f"{m['dataset']} / {m['variant']}: {m['why']}" for m in res["not_applicable"]) + "."]
    if res.get("stale"):
        lines += ["", "Left out, trained with settings the suite no longer asks for (running the suite again replaces them): "
                  + "; ".join(f"{m['dataset']} / {m['variant']} ({', '.join(m['changes'])})" for m in res["stale"]) + "."]
    if res.get("missing"):
        lines += ["", "Planned but not run yet (no results file): " + "; ".join(f"{m['dataset']} / {m['variant']} ({m['runs']} runs)" for m in res["missing"]) + "."]
    return "\n".join(lines) + "\n"


HEADLINE_MODELS = ("popularity", "sasrec", "hstu", "fuxi-alpha", "fuxi-mme")


def headline(res: dict[str, Any], metric: str = "test/NDCG@10") -> str:
    """Datasets x models pivot of the main suite (loo-val, base sizes)."""
    cells = {(e["dataset"], e["variant"]): e for e in res["results"]}
    datasets = list(dict.fromkeys(e["dataset"] for e in res["results"]))
    lines = ["| dataset | " + " | ".join(HEADLINE_MODELS) + " |", "|---" * (len(HEADLINE_MODELS) + 1) + "|"]
    for ds in datasets:
        row = []
        best = max((cells[(ds, m)][metric]["mean"] for m in HEADLINE_MODELS if (ds, m) in cells and metric in cells[(ds, m)]), default=None)
        for m in HEADLINE_MODELS:
            e = cells.get((ds, m))
            if e is None or metric not in e:
                row.append("-")
                continue
            v = f"{e[metric]['mean']:.4f} ± {e[metric]['std']:.4f} ({e['seeds']})"
            row.append(f"**{v}**" if e[metric]["mean"] == best else v)
        label = ds + (" (not the published ML-1M)" if ds == "ml-1m-ts70" else "")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# The scaling plot's series: a variant name before its " L=" / " E=", labelled for the legend.
SERIES_LABELS = {"fuxi-mme": "fuxi-mme (first defaults)", "fuxi-mme shipped": "fuxi-mme (ML-1M preset decoder)"}


def _series(variant: str, key: str) -> str:
    """``fuxi-mme shipped L=4`` -> ``fuxi-mme shipped`` (key ``L=``)."""
    return variant.split(key)[0].strip()


def plot_scaling(res: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [e for e in res["results"] if "test/NDCG@10" in e]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, key, label in ((axes[0], "L=", "layers"), (axes[1], "E=", "experts")):
        for fam in sorted({_series(e["variant"], key) for e in rows if key in e["variant"]}):
            pts = sorted((int(e["variant"].split(key)[1]), e) for e in rows if key in e["variant"] and _series(e["variant"], key) == fam)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            ys = [e["test/NDCG@10"]["mean"] for _, e in pts]
            err = [e["test/NDCG@10"]["std"] for _, e in pts]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=SERIES_LABELS.get(fam, fam))
            for x, (_, e) in zip(xs, pts):
                p = e.get("parameters", {}).get("non_embedding")
                t = e.get("train_seconds", {}).get("mean")
                if p is not None:
                    ax.annotate(f"{p / 1e3:.0f}k p" + (f", {t:.0f}s" if t else ""), (x, e["test/NDCG@10"]["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set(xlabel=label, ylabel="test NDCG@10", title=f"{rows[0]['dataset']}: test NDCG@10 vs {label}\n(points: non-embedding params, train s)")
    # the cost side: every variant against its non-embedding parameters, one series per sweep
    ax = axes[2]
    for key in ("L=", "E="):
        for fam in sorted({_series(e["variant"], key) for e in rows if key in e["variant"]}):
            pts = sorted((e["parameters"]["non_embedding"], e["test/NDCG@10"]["mean"]) for e in rows
                         if key in e["variant"] and _series(e["variant"], key) == fam and e.get("parameters"))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{SERIES_LABELS.get(fam, fam)}, {'layers' if key == 'L=' else 'experts'}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the 2x10^4.. labels overlap
    ax.set(xlabel="non-embedding parameters", ylabel="test NDCG@10", title=f"{rows[0]['dataset']}: test NDCG@10 vs parameters")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    plt.close(fig)
    return out


# Quoted, not ours: SPEC section 6, independent benchmark, Amazon 5-core leave-one-out, NDCG@10.
PUBLISHED_AMAZON = {
    "amazon-beauty": {"SASRec+SS": 0.0531, "HSTU": 0.0439, "FuXi-alpha": 0.0451},
    "amazon-sports": {"SASRec+SS": 0.0314, "HSTU": 0.0243, "FuXi-alpha": 0.0244},
    "amazon-toys": {"SASRec+SS": 0.0580, "HSTU": 0.0450, "FuXi-alpha": 0.0437},
}


# Two-sided 5% critical values of Student's t for 1..30 degrees of freedom (the standard table).
T_CRIT_05 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
             2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: float) -> float:
    """The two-sided 5% critical t for ``df`` degrees of freedom rounded down, and the value of 30
    beyond the table (both conservative: the critical value falls as df grows)."""
    return T_CRIT_05[min(max(int(df), 1), len(T_CRIT_05)) - 1]


def welch(a: dict[str, float], n_a: int, b: dict[str, float], n_b: int) -> tuple[float, float]:
    """Welch's t of mean a - mean b (``{"mean", "std"}`` with sample std over n seeds) and its
    Welch-Satterthwaite degrees of freedom. Zero spread on both sides: t is +-inf (or 0 when equal)."""
    va, vb = a["std"] ** 2 / n_a, b["std"] ** 2 / n_b
    diff = a["mean"] - b["mean"]
    if va + vb == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), float(n_a + n_b - 2)
    den = (va ** 2 / (n_a - 1) if n_a > 1 else 0.0) + (vb ** 2 / (n_b - 1) if n_b > 1 else 0.0)
    return diff / math.sqrt(va + vb), ((va + vb) ** 2 / den if den else float(n_a + n_b - 2))


def reading(t: float, df: float) -> str:
    """"ahead" / "behind" when Welch's test rejects equal means at 5% (two-sided), else "level"."""
    crit = t_critical(df)
    return "ahead" if t > crit else "behind" if t < -crit else "level"


def _main_spec(dataset: str, variant: str) -> tuple[str, str, str, tuple[str, ...]] | None:
    """(model, size, protocol, overrides) of a main-suite row, from the suite's own variant
    table (not its label); None for a row the main suite does not define."""
    spec = SUITES["main"].variants_for(dataset).get(variant)
    if spec is None:
        return None
    return spec[0], spec[2] if len(spec) > 2 else "base", spec[3] if len(spec) > 3 else SUITES["main"].protocol, tuple(spec[1])


def equal_size_comparison(res: dict[str, Any], metric: str = "test/NDCG@10") -> str:
    """Fuxi-MME against FuXi-alpha of the same size and protocol (equal embedding size) on every
    dataset of the main suite, with Welch's t over seeds and its reading at 5%."""
    cells: dict[tuple[str, str, str, str, tuple[str, ...]], dict[str, Any]] = {}
    for e in res["results"]:
        spec = _main_spec(e["dataset"], e["variant"])
        if spec is not None and metric in e:
            cells[(e["dataset"], *spec)] = e
    lines = ["| dataset | size | protocol | FuXi-alpha | Fuxi-MME | difference | Welch t (df) | reading at 5% |", "|---|---|---|---|---|---|---|---|"]
    for (ds, model, size, protocol, over), mme in cells.items():
        alpha = cells.get((ds, "fuxi-alpha", size, protocol, over))
        if model != "fuxi-mme" or alpha is None:
            continue
        a, m = alpha[metric], mme[metric]
        t, df = welch(m, mme["seeds"], a, alpha["seeds"])
        size = ", ".join([size, *over])
        lines.append(f"| {ds} | {size} | {protocol} | {a['mean']:.4f} ± {a['std']:.4f} ({alpha['seeds']}) | {m['mean']:.4f} ± {m['std']:.4f} ({mme['seeds']}) | "
                     f"{m['mean'] - a['mean']:+.4f} | {t:.1f} ({df:.1f}) | {reading(t, df)} |")
    return "\n".join(lines) + "\n"


def published_comparison(res: dict[str, Any]) -> str:
    """Fuxi-MME (each size) against the best published Amazon figure: above it beyond seed noise
    when a one-sample t-test of our seeds against that constant rejects equality at 5%."""
    # (dataset, model, size) -> (label, entry) of the plain loo-val rows (no extra overrides)
    cells: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {}
    for e in res["results"]:
        spec = _main_spec(e["dataset"], e["variant"])
        if spec is not None and spec[2:] == ("loo-val", ()) and "test/NDCG@10" in e:
            cells[(e["dataset"], spec[0], spec[1])] = (e["variant"], e)
    lines = ["| dataset | published SASRec+SS / HSTU / FuXi-alpha (quoted) | size | our fuxi-mme | our best model of that size | target met |", "|---|---|---|---|---|---|"]
    for ds, pub in PUBLISHED_AMAZON.items():
        for size in ("base", "large"):
            if (ds, "fuxi-mme", size) not in cells:
                continue
            mine = cells[(ds, "fuxi-mme", size)][1]
            ours = {label: e["test/NDCG@10"]["mean"] for (d, _, z), (label, e) in cells.items() if d == ds and z == size}
            best = max(ours, key=ours.get)
            m, top = mine["test/NDCG@10"], max(pub.values())
            n = mine["seeds"]
            # one-sample t against the quoted constant: Welch's t with a spread-free second side
            t, df = welch(m, n, {"mean": top, "std": 0.0}, 1)
            met = "yes, beyond seed noise" if n > 1 and reading(t, df) == "ahead" else "above, within seed noise" if m["mean"] > top else "no"
            lines.append(f"| {ds} | {' / '.join(f'{v:.4f}' for v in pub.values())} | {size} | {m['mean']:.4f} ± {m['std']:.4f} | {best} {ours[best]:.4f} | {met} |")
    return "\n".join(lines) + "\n"


# The order of the suites in docs/results.md (every suite of SUITES, tested).
DOC_ORDER = ("main", "ablation", "sweep", "capacity", "amazon", "width", "norm", "sports", "dropout", "temperature", "scaling", "precision", "loss")


def write_docs(root: Path, docs: Path) -> Path:
    """docs/results.md from every ``<root>/<suite>.json`` present (tables, headline, plots)."""
    parts = ["# Results", "", "Generated by `fuxi-mme experiment " + " ".join(DOC_ORDER) + " --root results --data-root ../shared/data",
             "--docs docs/results.md` (add `--aggregate-only` to rebuild the tables without running) from the runs under",
             "`results/` (each run folder holds its config, commit, device and metrics). Mean ± std over seeds (the number",
             "of seeds in parentheses); full ranking; protocol as named.", ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    for name in DOC_ORDER:
        f = root / f"{name}.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        if name == "main":
            base = {**res, "results": [e for e in res["results"] if e["protocol"] == "loo-val"]}
            parts += ["## Headline: test NDCG@10, loo-val, base sizes", "",
                      "Loss: SPEC's sampled softmax (128 negatives) on MovieLens; on Amazon the full softmax over the catalogue, the",
                      "Amazon presets' loss, chosen on validation by the `loss` suite below (SPEC's sampled loss on Amazon: the",
                      "\"(sampled loss)\" rows of the main table).", "", headline(base), "",
                      "### Against published Amazon figures", "",
                      "The published numbers are quoted from SPEC section 6 (an independent benchmark, leave-one-out, full ranking);",
                      "they are not our runs. The target is Fuxi-MME above the best of them.", "", published_comparison(res), "",
                      "### Fuxi-MME against FuXi-alpha at equal embedding size", "",
                      "Same size, protocol and seeds. Welch's t over seeds (degrees of freedom in parentheses); \"ahead\" or \"behind\"",
                      "when a two-sided test at 5% rejects equal means, otherwise \"level\".", "", equal_size_comparison(res), ""]
        if name == "scaling":
            img = plot_scaling(res, docs.parent / "scaling.png")
            if img is not None:
                parts += [f"![scaling]({img.name})", ""]
        parts += [markdown(res), ""]
    atomic_write_text(docs, "\n".join(parts))
    return docs
