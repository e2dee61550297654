"""Search spaces for ``fuxi-mme tune``: which config fields vary and over what.

A space is a mapping from a dotted config field to a range, in YAML::

    train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}   # float (log scale)
    model.num_layers: {low: 1, high: 4}                  # int (both ends whole numbers)
    model.dim: [64, 128, 256]                            # a list: one of these values

:func:`default_space` gives the one each model family gets without ``--space``. After a
sample is applied, fields tied to the width follow it (:func:`apply_params`), keeping the base
config's ratios: FuXi heads' qk/v width, SASRec's FFN width.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, read_yaml, set_field


@dataclass(frozen=True)
class Param:
    name: str  # dotted config field
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def sample(self, rng: random.Random) -> Any:
        if self.choices is not None:
            return rng.choice(self.choices)
        assert self.low is not None and self.high is not None
        if self.integer:
            return rng.randint(int(self.low), int(self.high))
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def including(self, value: Any) -> Param:
        """This range widened to hold ``value`` (the base config's own value: trial 0)."""
        if self.choices is not None:
            return self if value in self.choices else Param(self.name, choices=(*self.choices, value))
        assert self.low is not None and self.high is not None
        return Param(self.name, min(self.low, value), max(self.high, value), self.log, self.integer)

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{self.low:g}, {self.high:g}]{' log' if self.log else ''}{' int' if self.integer else ''}"


Space = dict[str, Param]

_COMMON = {
    "train.lr": {"low": 2.0e-4, "high": 3.0e-3, "log": True},
    "model.dropout": {"low": 0.1, "high": 0.7},
    "train.temperature": [0.035, 0.05, 0.07, 0.1],
    "model.dim": [64, 128, 256],
    "model.num_layers": {"low": 1, "high": 4},
}
# Fuxi-MME's own choices (docs/models.md#how-the-defaults-were-chosen): streams, experts, top-k
_MME = {"model.num_embeddings": [2, 4, 8], "model.moe.num_experts": [0, 4, 8], "model.moe.top_k": [1, 2]}


def default_space(model: str) -> Space:
    """The space a model family is tuned over without ``--space`` (docs/training.md#tuning)."""
    spec: dict[str, Any] = dict(_COMMON)
    if model == "fuxi-mme":
        spec.update(_MME)
    if model == "popularity":
        raise ConfigError("popularity has no hyperparameters to tune; pick a neural model with --model")
    return parse_space(spec, "the default space")


def parse_space(spec: Any, where: str) -> Space:
    """A space from a parsed YAML mapping; a mistake is a ConfigError naming the field."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: a search space is a mapping of config fields to ranges, e.g. train.lr: {{low: 1.0e-4, high: 3.0e-3, log: true}}")
    probe = Config()
    out: Space = {}
    for name, rng in spec.items():
        set_field(probe, str(name), _probe_value(rng, str(name), where))  # an unknown field or a wrong type is named here
        if isinstance(rng, list):
            if not rng:
                raise ConfigError(f"{where}: {name} has an empty list of choices")
            out[name] = Param(name, choices=tuple(rng))
            continue
        if not isinstance(rng, dict) or not {"low", "high"} <= set(rng) or set(rng) - {"low", "high", "log"}:
            raise ConfigError(f"{where}: {name} must be a list of choices or {{low: L, high: H}} (optionally log: true), got {rng!r}")
        low, high, log_scale = rng["low"], rng["high"], bool(rng.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise ConfigError(f"{where}: {name} needs numbers with low <= high, got low={low!r} high={high!r}")
        if log_scale and low <= 0:
            raise ConfigError(f"{where}: {name} on a log scale needs low > 0, got {low}")
        integer = isinstance(low, int) and isinstance(high, int)
        out[name] = Param(name, float(low) if not integer else low, float(high) if not integer else high, log_scale, integer)
    return out


def _probe_value(rng: Any, name: str, where: str) -> Any:
    if isinstance(rng, list) and rng:
        return rng[0]
    if isinstance(rng, dict) and "low" in rng:
        return rng["low"]
    raise ConfigError(f"{where}: {name} must be a list of choices or {{low: L, high: H}}, got {rng!r}")


def load_space(path: str | Path) -> Space:
    spec = read_yaml(path, "search space", "pass a YAML file (docs/training.md#tuning shows one)")
    return parse_space(spec, str(path))


def base_values(space: Space, cfg: Config) -> dict[str, Any]:
    """The base config's own value of every field in ``space`` (trial 0 runs them)."""
    out = {}
    for name in space:
        obj: Any = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        out[name] = obj
    return out


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """``base`` with ``params`` set, and the fields tied to the width following it."""
    cfg = Config()
    from ..config import apply_mapping

    apply_mapping(cfg, base.to_dict())
    for name, value in params.items():
        set_field(cfg, name, value)
    m, b = cfg.model, base.model
    if "model.dim" in params and m.dim != b.dim:
        if "model.qk_dim" not in params:  # heads keep the base's share of the width
            m.qk_dim = m.v_dim = max(1, round(b.qk_dim * m.dim / b.dim))
        if "model.ffn_dim" not in params:
            m.ffn_dim = max(1, round(b.ffn_dim * m.dim / b.dim))
    if m.moe.num_experts:
        m.moe.top_k = min(m.moe.top_k, m.moe.num_experts)
    return cfg
