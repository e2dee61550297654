"""Named presets: ``<dataset>-<model>-<size>``, e.g. ``ml-1m-fuxi-alpha-base``.

A preset combines a data *shape* (``shapes.py``: data and training settings) with a model
family's dimensions for that shape (docs/models.md#reference-hyperparameters). Shapes without
published dimensions (demo, Amazon-like) use choices documented in ``docs/models.md``. Own data
gets the same defaults through its measured shape (:func:`build_defaults`).
"""

from __future__ import annotations

from .config import Config, ConfigError
from .shapes import DATASETS, SHAPES

# (dim, layers, heads, qk_dim = v_dim, ffn_multiply) per model family and size, per dim group.
FUXI_DIMS = {
    "ml-1m": {"base": (50, 2, 1, 50, 1.0), "large": (50, 8, 2, 25, 1.0)},
    "ml-20m": {"base": (256, 2, 4, 64, 4.0), "large": (256, 8, 8, 32, 4.0)},
    # Amazon large is wider, not deeper: the `width` suite's d = 256 beat d = 64 and 128 on mean
    # validation for every model, while 4 layers were level with 2 (`amazon` suite; docs/models.md)
    "amazon": {"base": (64, 2, 2, 32, 1.0), "large": (256, 2, 2, 128, 1.0)},
    "demo": {"base": (48, 2, 1, 48, 1.0), "large": (48, 4, 2, 24, 1.0)},
}
SASREC_DIMS = {  # (dim, layers, heads, ffn_dim)
    "ml-1m": {"base": (50, 2, 1, 50), "large": (50, 8, 2, 50)},
    "ml-20m": {"base": (256, 4, 4, 256), "large": (256, 8, 8, 256)},
    "amazon": {"base": (64, 2, 2, 64), "large": (256, 2, 2, 256)},
    "demo": {"base": (48, 2, 1, 48), "large": (48, 4, 2, 48)},
}


MODEL_FAMILIES = ("fuxi-mme", "fuxi-alpha", "hstu", "sasrec", "llama", "ssm", "popularity")
SIZES = ("base", "large")

# Fuxi-MME defaults (the paper leaves them open; docs/models.md#how-the-defaults-were-chosen).
MME_DEFAULTS = {
    "num_embeddings": 2,
    "moe.num_experts": 4,
    "moe.top_k": 2,
    "moe.placement": "ffn",
    "moe.balance": "aux_loss",
    "moe.aux_loss_weight": 0.01,
}
# Fuxi-MME's decoder per dim group, chosen on validation by the `capacity` and `amazon` suites
# (docs/models.md). The item tables keep the total width d everywhere and the decoder runs at
# width d / M. The first defaults (a group not listed here) also shrink the heads by M, keep
# the experts at the decoder's width and share one decoder between the streams. "full_heads":
# the heads keep FuXi-alpha's per-head width; the other keys are `model.` fields. ML-20M and
# demo were not measured; ML-100K overfits the ML-1M group's wider decoder (Shape.mme).
MME_DECODERS: dict[str, dict[str, object]] = {
    "ml-1m": {"full_heads": True, "ffn_multiply": 4.0, "shared_decoder": False},
    # eight streams of width 8: the `amazon` suite's best mean validation NDCG@10 over Beauty,
    # Sports and Toys, level with 4 layers at a third of the training time
    "amazon": {"full_heads": True, "num_embeddings": 8},
}

# Dropout of the large size where it differs from the shape's, per dims group and model family:
# on Amazon the d = 256 FuXi-alpha, Fuxi-MME and HSTU chose 0.6 over the 0.5 chosen at the base
# width (mean validation NDCG@10 over Beauty, Sports and Toys; `dropout` suite, docs/models.md);
# SASRec large chose 0.5 (lower validation at 0.6 on all three) and keeps the shape's value.
LARGE_DROPOUT: dict[str, dict[str, float]] = {"amazon": {"fuxi-alpha": 0.6, "fuxi-mme": 0.6, "hstu": 0.6}}
# Softmax temperature of the large size where it differs from train.temperature's 0.05 (docs/models.md#loss):
# on Amazon the d = 256 FuXi-alpha and Fuxi-MME chose 0.07 over 0.035, 0.05 and 0.1 on mean
# validation NDCG@10 over Beauty, Sports and Toys (`temperature` suite, docs/models.md). HSTU
# and SASRec large were not measured there and keep 0.05.
LARGE_TEMPERATURE: dict[str, dict[str, float]] = {"amazon": {"fuxi-alpha": 0.07, "fuxi-mme": 0.07}}


def preset_name(dataset: str, model: str, size: str = "base") -> str:
    return f"{dataset}-{model}" if model == "popularity" else f"{dataset}-{model}-{size}"


def parse_preset(name: str) -> tuple[str, str, str]:
    """``ml-1m-fuxi-mme-base`` -> (``ml-1m``, ``fuxi-mme``, ``base``)."""
    for ds in sorted(DATASETS, key=len, reverse=True):
        if not name.startswith(ds + "-"):
            continue
        rest = name[len(ds) + 1 :]
        if rest == "popularity":
            return ds, "popularity", "base"
        for m in MODEL_FAMILIES:
            for s in SIZES:
                if rest == f"{m}-{s}":
                    return ds, m, s
    raise ConfigError(_unknown_preset(name))


def _unknown_preset(name: str) -> str:
    """Which part of ``name`` is unknown, with the known values of that part."""
    models = f"model families: {', '.join(MODEL_FAMILIES)}; sizes: {', '.join(SIZES)} (popularity has none)"
    datasets = f"datasets with presets: {', '.join(DATASETS)} (your own data: --source FILE, defaults by its shape)"
    tails = [preset_name("", m, s)[1:] for m in MODEL_FAMILIES for s in SIZES]
    dataset = next((name[: -len(t) - 1] for t in tails if name.endswith("-" + t)), None)
    if dataset is not None:
        return f"unknown preset {name!r}: unknown dataset {dataset!r}; {datasets}"
    known = next((ds for ds in sorted(DATASETS, key=len, reverse=True) if name.startswith(ds + "-")), None)
    if known is not None:
        return f"unknown preset {name!r}: unknown model or size {name[len(known) + 1 :]!r}; {models}"
    return f"unknown preset {name!r} (form: <dataset>-<model>-<size>); {datasets}; {models}; `fuxi-mme presets` lists them"


def all_presets() -> list[str]:
    out = []
    for ds in DATASETS:
        for m in MODEL_FAMILIES:
            if m == "popularity":
                out.append(preset_name(ds, m))
            else:
                out.extend(preset_name(ds, m, s) for s in SIZES)
    return out


def build_preset(name: str) -> Config:
    """The config of a named preset: its dataset's shape and settings, the model's dimensions."""
    dataset, model, size = parse_preset(name)
    cfg = build_defaults(DATASETS[dataset].shape, model, size, dataset)
    for k, v in DATASETS[dataset].overrides.items():
        setattr(cfg.data, k, v)
    return cfg


def build_defaults(shape_name: str, model: str, size: str, dataset: str) -> Config:
    """Defaults of ``model`` at ``size`` for data of shape ``shape_name`` (``shapes.SHAPES``)."""
    from .config import set_field

    if shape_name not in SHAPES:
        raise ConfigError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)} (`fuxi-mme presets` describes them)")
    if model not in MODEL_FAMILIES:
        raise ConfigError(f"unknown model {model!r}; model families: {', '.join(MODEL_FAMILIES)}")
    shape = SHAPES[shape_name]
    cfg = Config(preset=preset_name(dataset, model, size), shape=shape_name)
    cfg.data.name = dataset
    cfg.data.max_len = shape.max_len
    cfg.train.epochs = shape.epochs
    cfg.train.patience = shape.patience
    cfg.train.loss = shape.loss
    m = cfg.model
    m.name = model
    m.dropout = LARGE_DROPOUT.get(shape.dims, {}).get(model, shape.dropout) if size == "large" else shape.dropout
    if size == "large" and model in LARGE_TEMPERATURE.get(shape.dims, {}):
        cfg.train.temperature = LARGE_TEMPERATURE[shape.dims][model]
    if model in ("fuxi-alpha", "fuxi-mme", "hstu", "llama", "popularity"):
        m.dim, m.num_layers, m.num_heads, qk, m.ffn_multiply = FUXI_DIMS[shape.dims][size]
        m.qk_dim = m.v_dim = qk
    if model == "sasrec":
        m.dim, m.num_layers, m.num_heads, m.ffn_dim = SASREC_DIMS[shape.dims][size]
    if model == "ssm":  # the FuXi groups' width and depth; state 16, convolution 4, expand 2 (docs/models.md#state-space-encoder)
        m.dim, m.num_layers = FUXI_DIMS[shape.dims][size][:2]
    if model == "fuxi-mme":
        decoder = dict(MME_DECODERS.get(shape.mme or shape.dims, {}))
        full_heads = decoder.pop("full_heads", False)
        for k, v in {**MME_DEFAULTS, **decoder}.items():
            set_field(cfg, f"model.{k}", v)
        if not full_heads:  # the heads shrink with the decoder's width d / M
            m.qk_dim = m.v_dim = max(1, m.qk_dim // m.num_embeddings)
    return cfg
