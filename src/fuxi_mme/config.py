"""Typed run configuration: one dataclass per component, YAML files and ``--set`` overrides.

A :class:`Config` is the single source of truth for a run. It is built from a named preset
(:mod:`fuxi_mme.presets`), optionally a YAML file, then ``section.field=value`` overrides, and
written fully resolved to ``config.json`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A user-facing configuration problem (unknown key, wrong type, bad value)."""


@dataclass
class NoiseConfig:
    """Noise in the training part of each sequence (docs/training.md#robustness-protocols); off by default."""

    kind: str = "none"  # "none", "insert" (random items), "replace" (random items), "shuffle" (local windows)
    rate: float = 0.0  # in [0, 1): share of training events inserted, replaced, or chance a window is shuffled
    sampling: str = "uniform"  # random items: "uniform" over the catalogue or "popularity" (training counts)
    window: int = 3  # shuffle: events per local window
    eval: bool = False  # also perturb the histories fed at evaluation (targets stay clean)


@dataclass
class SparsityConfig:
    """Fewer training events per user (docs/training.md#robustness-protocols); off by default."""

    kind: str = "none"  # "none", "last_k" (keep each user's last k training events), "drop" (drop a share at random)
    k: int = 20  # last_k: training events kept per user (at least 2)
    rate: float = 0.0  # drop: in [0, 1), share of each user's training events dropped


@dataclass
class DataConfig:
    """Which dataset, how it is split and how sequences are cut."""

    name: str = "demo"  # a named dataset ("demo", "ml-100k", ...) or "file" with `path`
    path: str | None = None  # user file (CSV/TSV/Parquet/JSONL), or a named dataset's folder, archive or URL
    user_col: str = "user"
    item_col: str = "item"
    time_col: str | None = "timestamp"  # None: no timestamps, file order is the sequence order
    rating_col: str | None = None
    sep: str | None = None  # text separator of dataset "file"; None: detected from the content
    # dataset "file": the layout ("auto": detected from the content; table, sequences, pairs,
    # movielens or sessions) and whether a text table has a header row (None: detected)
    format: str = "auto"
    header: bool | None = None
    min_rating: float | None = None  # keep only interactions with rating >= this
    min_user_interactions: int | None = None  # None: the dataset's published filter (KuaiRand 5), else 2
    duplicates: str = "auto"  # exact duplicate (user, item, timestamp) rows: "error", "drop", "keep", "auto" (per dataset)
    ordering: str = "stable"  # "stable" (ties keep file order) or "hstu"
    # how a table is prepared (docs/datasets.md#large-logs): "memory" (pandas, every option),
    # "columnar" (out-of-core: Parquet row groups partitioned by user on disk, int32 ids,
    # memory-mapped cache; integer ids, duplicates keep/drop, ordering stable) or "auto"
    # (columnar for a Parquet file or folder over 50M rows)
    engine: str = "auto"
    # repeat consumption (an item the user had before), applied before the splits: "keep",
    # "drop-consecutive" (an event equal to the user's previous one) or "first" (first of each item)
    repeats: str = "keep"
    protocol: str = "loo-val"  # "loo-val" (leak-free) or "paper" (HSTU/FuXi-alpha compatible)
    max_len: int = 200  # most recent items the model sees
    data_dir: str | None = None  # cache folder; None: $FUXI_MME_DATA or the user cache dir
    demo_users: int = 3000  # size of the built-in demo dataset
    demo_seed: int = 0
    # event types (docs/datasets.md#behaviours): None (none), "auto" (the source's own behaviour
    # column: demo, OTTO sessions, KuaiRand), "rating" (star buckets 1-2 / 3 / 4-5) or a column
    # of a table file
    behavior: str | None = None
    # next-item loss and leave-one-out targets over events of this behaviour only (the history
    # keeps every event); None: every event
    target_behavior: str | None = None
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)


@dataclass
class MoEConfig:
    """Mixture-of-Experts layer (Fuxi-MME). ``num_experts == 0`` disables it."""

    num_experts: int = 0
    top_k: int = 2
    placement: str = "ffn"  # "ffn" (stage-2 SwiGLU), "u" (u projection), "out" (stage-1 output)
    shared_expert: bool = False
    router_noise: float = 0.0  # std of Gaussian noise added to router logits while training
    balance: str = "aux_loss"  # "aux_loss", "aux_free" (bias updates) or "none"
    aux_loss_weight: float = 0.01
    bias_update_rate: float = 1e-3  # aux_free: step of the per-expert selection bias
    stream_embedding: bool = False  # add a learned per-stream vector before the router
    backend: str = "auto"  # "loop" (reference), "batched", "dense", or "auto" (dense when E <= 4K)


@dataclass
class ModelConfig:
    """Architecture. Fields a model family does not use are ignored by it."""

    name: str = "fuxi-alpha"  # fuxi-alpha, fuxi-mme, hstu, sasrec, llama, popularity
    dim: int = 50  # d: item embedding width (total, over all streams for fuxi-mme)
    num_layers: int = 2
    num_heads: int = 1
    qk_dim: int = 50  # per head
    v_dim: int = 50  # per head
    ffn_multiply: float = 1.0  # SwiGLU hidden = ffn_multiply * width (FuXi blocks, llama)
    ffn_dim: int = 50  # sasrec ReLU FFN width
    dropout: float = 0.2
    num_time_buckets: int = 128  # bucket ids 0..num_time_buckets (129 scalars)
    time_bucket_divisor: float = 0.301
    use_temporal: bool = True  # disabled automatically when the dataset has no timestamps
    # add a learned behaviour embedding to the item input (needs data.behavior; docs/models.md#behaviour-input)
    use_behavior: bool = False
    # N in the semantic channel's phi(q k^T) / N: 0 is the padded length (data.max_len; docs/models.md#attention-channels); a
    # positive value divides by it instead (e.g. about the mean sequence length on short-sequence data)
    attention_norm: float = 0.0
    attention: str = (
        "auto"  # "reference" (PyTorch), "fused" (Triton kernel, GPU), "auto" (the reference: faster in the whole step, see docs/performance.md)
    )
    # Fuxi-MME
    num_embeddings: int = 1  # M: item sub-tables of width dim / M
    shared_decoder: bool = True  # one stack for all streams (folded into the batch) or one per stream
    shared_positions: bool = False  # one positional table for all streams
    combine: str = "concat"  # "concat" (cosine of concatenated streams) or "mean" (mean of per-stream cosines)
    moe: MoEConfig = field(default_factory=MoEConfig)
    # State space (the `ssm` model and model.mixer; docs/models.md#state-space-encoder)
    # FuXi-alpha / Fuxi-MME blocks: "attention" (the published block), "ssm" (state-space
    # blocks instead of FuXi blocks), "hybrid" (a state-space block after every FuXi block)
    mixer: str = "attention"
    ssm_state: int = 16  # state size per inner channel
    ssm_conv: int = 4  # width of the causal depthwise convolution
    ssm_expand: int = 2  # inner width = ssm_expand * width
    ssm_dt_rank: int = 0  # rank of the step-size projection; 0: ceil(width / 16)
    # "auto" (mamba-ssm's CUDA kernel when installed and on a GPU, else chunked), "reference"
    # (sequential), "chunked" (parallel scan in PyTorch), "kernel" (mamba-ssm, required)
    ssm_scan: str = "auto"
    ssm_chunk: int = 64  # positions per chunk of the chunked scan (a power of two)
    # FuXi-alpha / Fuxi-MME noise decoupling before the blocks (docs/models.md#noise-decoupling):
    # "none" (the published model), "filter" (learnable causal frequency-domain filter), "gate"
    # (per-event keep weight, hard-dropped below 0.1 in training, with a sparsity penalty)
    denoise: str = "none"
    denoise_weight: float = 0.01  # gate: weight of the mean keep weight added to the loss


@dataclass
class TrainConfig:
    epochs: int = 101
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    # "sampled": softmax over the target and num_negatives uniform negatives per position
    # (docs/models.md#loss); "full": softmax over the whole catalogue (no sampling; num_negatives unused)
    loss: str = "sampled"
    num_negatives: int = 128
    temperature: float = 0.05
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    tf32: bool = True
    amp: str = "none"  # "none" or "bf16" (autocast on GPU; fp32 master weights)
    # torch.compile of the model: true (every step), false, or "auto": compiled for the CUDA-graph
    # step (single-process CUDA with triton installed, not deterministic), where it fuses the
    # elementwise work; eager steps (the final partial batch, a refused capture) use the plain model
    compile: bool | str = "auto"
    # CUDA graphs for forward + loss + backward (static buffers, one graph per bucket of target
    # counts); "auto": on for single-process CUDA training
    cuda_graphs: str = "auto"
    # eager step: sort the batch's rows by length and run them in this many chunks, each padded
    # only to its own longest sequence (same loss, MoE aux loss and gradients); "auto": up to 6
    # (chunks of 16 rows or more) on CPU, else 1
    length_chunks: str = "auto"
    grad_clip: float | None = None
    schedule: str = "constant"  # "constant" or "cosine"
    warmup_steps: int = 0
    grad_accum: int = 1
    eval_every: int = 1  # epochs between evaluations (validation under loo-val)
    patience: int | None = 10  # loo-val early stopping, in evaluations; None: never stop early
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests)
    deterministic: bool = False
    num_threads: int | None = None  # CPU threads; None: torch's default
    # under torchrun: shard the item table (and its optimizer state) across ranks with FSDP2
    # instead of replicating it (docs/training.md#sharded-item-tables); false: plain DDP
    shard_items: bool = False
    dist_timeout: float = 900.0  # seconds a collective may wait under torchrun before failing


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (10, 50, 200)
    # which of a user's earlier items are candidates (docs/training.md#history-masking):
    # "mask" removes every history item, a repeated target included; "keep" masks nothing;
    # "auto" is mask unless the training events show repeat consumption, then keep
    history: str = "auto"
    batch_size: int = 1024  # users per evaluation batch (fewer when users x items would pass 2^30 scores)
    # Report the per-epoch test curve under `paper` (labelled; never used for selection).
    log_test_curve: bool = False
    # beyond-accuracy metrics (coverage, Gini, entropy, novelty, popularity, long tail, ILD) of
    # the same top-K lists at every evaluation (docs/training.md#beyond-accuracy-metrics)
    beyond: bool = True
    # how targets are ranked (docs/training.md#fused-ranking): "scores" writes each batch's
    # (users x items) scores; "fused" counts the items above each target in one Triton kernel
    # without writing them (CUDA, beyond=false); "auto": fused where it can run, else scores
    ranking: str = "auto"
    # evaluate the test split once at the end; `tune` trials set false: test is evaluated for
    # the chosen configuration alone (docs/training.md#tuning)
    final_test: bool = True


@dataclass
class LogConfig:
    run_dir: str | None = None  # None: runs/<time>-<preset>
    progress: bool = True
    tensorboard: bool = False


@dataclass
class Config:
    preset: str = "custom"
    # the data shape whose defaults the preset holds (shapes.py; docs/datasets.md#defaults-by-shape)
    shape: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------- coercion


_PLAIN_TYPES = {int: "an integer", float: "a number", str: "text", bool: "true/false", type(None): "none"}


def _type_name(tp: Any) -> str:
    """A type as a user reads it in a message: ``float | None`` -> "a number or none"."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return _PLAIN_TYPES.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML, JSON or a ``--set`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(tp), where)
    for scalar, convert in _SCALARS:
        if tp is scalar:
            return convert(value, where)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """The first of the union's types that ``value`` reads as (None for none/null when allowed)."""
    args = typing.get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in args:
            return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: cannot read {value!r} as {_type_name(tp)}")


def _coerce_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple:
    """A list, tuple or ``"(a, b)"`` / ``"[a, b]"`` / ``"a,b"`` string as a fixed-length or ``tuple[X, ...]`` tuple."""
    if isinstance(value, str):
        value = [v for v in value.translate(str.maketrans("", "", "()[]")).split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], where) for v in value)
    if len(args) != len(value):
        raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
    return tuple(_coerce(v, a, where) for v, a in zip(value, args))


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_SCALARS: tuple[tuple[type, Callable[[Any, str], Any]], ...] = ((bool, _to_bool), (int, _to_int), (float, _to_float), (str, _to_str))


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _filter_history(cfg: Config, value: Any) -> None:
    on = _coerce(value, bool, "eval.filter_history")
    log.warning("eval.filter_history is deprecated: use eval.history=%s (mask|keep|auto; docs/training.md#history-masking)", "mask" if on else "keep")
    cfg.eval.history = "mask" if on else "keep"


# old keys still read (e.g. from an older run's config.json), each turned into its replacement
DEPRECATED_KEYS = {"eval.filter_history": _filter_history}


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.field`` (nested: ``model.moe.num_experts``) with type checking."""
    if dotted in DEPRECATED_KEYS:
        DEPRECATED_KEYS[dotted](cfg, value)
        return
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields = _fields(obj)
        where = ".".join(parts[: i + 1])
        if part not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {where!r}; known keys here: {known}")
        f = fields[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where} is a section; set one of its fields, e.g. {where}.<field>=...")
                for k, v in value.items():
                    set_field(cfg, f"{dotted}.{k}", v)
            else:
                setattr(obj, part, _coerce(value, f.type, where))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{where} is a value, not a section")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings (``--set``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    return cfg


def apply_mapping(cfg: Config, mapping: dict[str, Any], prefix: str = "") -> Config:
    """Apply a nested mapping (from YAML or JSON) on top of ``cfg``."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key == "preset" and not prefix:
            cfg.preset = str(value)
            continue
        if key == "shape" and not prefix:
            cfg.shape = None if value is None else str(value)
            continue
        set_field(cfg, dotted, value)
    return cfg


def read_yaml(path: str | Path, what: str = "config file", hint: str = "pass the path of a YAML file") -> Any:
    """A YAML file's parsed content; a missing file or bad YAML is a ConfigError naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; {hint}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {yaml_problem(exc)}") from exc


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (``line L, column C``), without
    PyYAML's multi-line excerpt of the text."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = read_yaml(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
    return data


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``config.json`` (unknown keys are an error)."""
    cfg = Config()
    return apply_mapping(cfg, d)


# data.sep spellings that are not the separator itself (a --set value loses its spaces and tabs)
SEP_ALIASES = {"tab": "\t", "\\t": "\t", "whitespace": " "}


def _separator(sep: str | None) -> str | None:
    """data.sep as the readers take it: None (detected), one character, ``::``, or " " for any
    run of spaces and tabs; raises ConfigError naming the spellings otherwise."""
    if sep is None:
        return None
    sep = SEP_ALIASES.get(sep.lower(), sep)
    if len(sep) == 1 or sep == "::":
        return sep
    got = " is empty (--set drops spaces and tabs)" if not sep else f"={sep!r} is not one character"
    raise ConfigError(
        f"data.sep{got}: give one character (--set 'data.sep=;'), tab, whitespace (any run of spaces), :: or none (detected from the file)"
    )


def validate(cfg: Config) -> None:
    """Check values that types alone do not catch; raise ConfigError naming the fix. Spells
    data.sep as the readers take it (``tab`` -> a tab)."""
    cfg.data.sep = _separator(cfg.data.sep)
    choices = {
        "data.protocol": (cfg.data.protocol, ("loo-val", "paper")),
        "data.ordering": (cfg.data.ordering, ("stable", "hstu")),
        "data.duplicates": (cfg.data.duplicates, ("auto", "error", "drop", "keep")),
        "data.repeats": (cfg.data.repeats, ("keep", "drop-consecutive", "first")),
        "data.format": (cfg.data.format, ("auto", "table", "sequences", "pairs", "movielens", "sessions")),
        "eval.history": (cfg.eval.history, ("auto", "mask", "keep")),
        "eval.ranking": (cfg.eval.ranking, ("auto", "scores", "fused")),
        "model.combine": (cfg.model.combine, ("concat", "mean")),
        "model.moe.placement": (cfg.model.moe.placement, ("ffn", "u", "out")),
        "model.moe.balance": (cfg.model.moe.balance, ("aux_loss", "aux_free", "none")),
        "model.moe.backend": (cfg.model.moe.backend, ("auto", "loop", "batched", "dense")),
        "model.attention": (cfg.model.attention, ("auto", "reference", "fused")),
        "train.amp": (cfg.train.amp, ("none", "bf16")),
        "train.cuda_graphs": (cfg.train.cuda_graphs, ("auto", "on", "off")),
        "train.schedule": (cfg.train.schedule, ("constant", "cosine")),
        "train.loss": (cfg.train.loss, ("sampled", "full")),
        "data.noise.kind": (cfg.data.noise.kind, ("none", "insert", "replace", "shuffle")),
        "data.noise.sampling": (cfg.data.noise.sampling, ("uniform", "popularity")),
        "data.sparsity.kind": (cfg.data.sparsity.kind, ("none", "last_k", "drop")),
        "model.denoise": (cfg.model.denoise, ("none", "filter", "gate")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    m = cfg.model
    positive: dict[str, int] = {
        "data.max_len": cfg.data.max_len,
        "train.batch_size": cfg.train.batch_size,
        "train.num_negatives": cfg.train.num_negatives,
        "train.grad_accum": cfg.train.grad_accum,
        "model.dim": m.dim,
        "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads,
        "train.epochs": cfg.train.epochs,
        "train.eval_every": cfg.train.eval_every,
    }
    for key, n in positive.items():  # first: the checks below divide by some of these
        if n < 1:
            raise ConfigError(f"{key}={n} must be at least 1")
    if m.num_embeddings < 1 or m.dim % m.num_embeddings:
        fits = [k for k in range(2, 9) if m.dim % k == 0]
        raise ConfigError(
            f"model.num_embeddings={m.num_embeddings} must be >= 1 and divide model.dim={m.dim} "
            f"(set both; at this dim: {', '.join(map(str, [1, *fits]))})"
        )
    if m.moe.num_experts and not (1 <= m.moe.top_k <= m.moe.num_experts):
        raise ConfigError(f"model.moe.top_k={m.moe.top_k} must be in 1..model.moe.num_experts={m.moe.num_experts}")
    if not cfg.train.lr > 0:
        raise ConfigError(f"train.lr={cfg.train.lr} must be positive (the presets use 1e-3)")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={cfg.train.weight_decay} must be 0 or more")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if cfg.train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps} must be 0 or more")
    if cfg.train.patience is not None and cfg.train.patience < 1:
        raise ConfigError(f"train.patience={cfg.train.patience} must be at least 1 (or null: never stop early)")
    if isinstance(cfg.train.compile, str) and cfg.train.compile != "auto":
        raise ConfigError(f"train.compile={cfg.train.compile!r} must be true, false or auto")
    lc = str(cfg.train.length_chunks)
    if lc != "auto" and not (lc.isdigit() and int(lc) >= 1):
        raise ConfigError(f"train.length_chunks={lc!r} must be auto or a whole number of at least 1")
    if m.attention_norm < 0:
        raise ConfigError(
            f"model.attention_norm={m.attention_norm} must be 0 (the padded length, docs/models.md#attention-channels) or a positive divisor"
        )
    _validate_robustness(cfg)
    _validate_behavior(cfg)
    if cfg.train.temperature <= 0:
        raise ConfigError(f"train.temperature={cfg.train.temperature} must be positive")
    if not cfg.eval.ks or min(cfg.eval.ks) < 1:
        raise ConfigError(f"eval.ks={cfg.eval.ks} must be positive cut-offs such as 10,50,200")


def _validate_robustness(cfg: Config) -> None:
    """The noise and sparsity protocols and the denoise option (docs/training.md#robustness-protocols)."""
    for key, rate in (("data.noise.rate", cfg.data.noise.rate), ("data.sparsity.rate", cfg.data.sparsity.rate)):
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"{key}={rate} must be in [0, 1)")
    if cfg.data.sparsity.k < 2:
        raise ConfigError(f"data.sparsity.k={cfg.data.sparsity.k} must be at least 2 (a training window needs an input and a target)")
    if cfg.data.noise.window < 2:
        raise ConfigError(f"data.noise.window={cfg.data.noise.window} must be at least 2 (a shuffled window of one event is unchanged)")
    if cfg.model.denoise_weight < 0:
        raise ConfigError(f"model.denoise_weight={cfg.model.denoise_weight} must be 0 or more")


def _validate_behavior(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    if d.behavior is not None and not str(d.behavior).strip():
        raise ConfigError("data.behavior is empty; use auto, rating or a column name (or leave it unset for none)")
    if d.behavior is None and (d.target_behavior is not None or m.use_behavior):
        key = "data.target_behavior" if d.target_behavior is not None else "model.use_behavior"
        raise ConfigError(f"{key} needs behaviours in the data: set data.behavior=auto (the source's own), rating or a column name")
    if m.use_behavior and m.name in ("ssm", "popularity"):
        raise ConfigError(f"model.use_behavior is not supported by model {m.name!r}; use fuxi-alpha, fuxi-mme, hstu, sasrec or llama")
