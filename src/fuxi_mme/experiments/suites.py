"""Experiment suites as data: one YAML file per suite in ``experiments/suites/``.

A suite file holds::

    description: what the suite measures (the heading of its table)
    datasets: [ml-100k, amazon-beauty]
    seeds: [0, 1, 2]                    # optional; the default
    model_seeds: {fuxi-mme: [0, 1, 2, 3, 4]}   # optional; one model family's seeds instead
    protocol: loo-val                   # optional; the default
    sets: [train.loss=sampled]          # optional; overrides for every run, first
    model_sets: {fuxi-mme: [...]}       # optional; overrides for one family's runs, next
    variants:                           # table row name -> what it trains
      "+moe": {model: fuxi-mme, sets: [...], size: base, protocol: loo-val}
    extra:                              # optional; rows for some datasets only
      - datasets: [ml-1m-ts70]
        variants: {...}

Overrides are ``--set`` strings; ``{qk_full}`` and the other placeholders are filled per dataset
by :func:`fuxi_mme.experiments.plan.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import yaml_problem
from ..presets import MODEL_FAMILIES, SIZES

SUITES_DIR = Path(__file__).with_name("suites")
SUITE_KEYS = ("description", "datasets", "seeds", "model_seeds", "protocol", "sets", "model_sets", "variants", "extra")
VARIANT_KEYS = ("model", "sets", "size", "protocol")


class SuiteError(ValueError):
    """A suite file that cannot be read (unknown key, missing model, wrong type)."""


@dataclass(frozen=True)
class Variant:
    """One row of a suite's table: a model family at a size, with overrides after the suite's."""

    model: str
    sets: tuple[str, ...] = ()
    size: str = "base"
    protocol: str | None = None  # None: the suite's


@dataclass
class Suite:
    """A grid of runs: every dataset x variant x seed."""

    name: str
    datasets: list[str]
    variants: dict[str, Variant]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    protocol: str = "loo-val"
    description: str = ""
    extra: list[tuple[tuple[str, ...], dict[str, Variant]]] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    model_sets: dict[str, list[str]] = field(default_factory=dict)
    model_seeds: dict[str, list[int]] = field(default_factory=dict)

    def variants_for(self, dataset: str) -> dict[str, Variant]:
        """The suite's variants plus the extra ones for ``dataset``, in file order."""
        out = dict(self.variants)
        for group, more in self.extra:
            if dataset in group:
                out.update(more)
        return out

    def protocol_of(self, variant: Variant) -> str:
        return variant.protocol or self.protocol

    def seeds_of(self, variant: Variant) -> list[int]:
        return self.model_seeds.get(variant.model, self.seeds)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SuiteError(f"{where} must be a list of strings, got {value!r}")
    return list(value)


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SuiteError(f"{where} must be a list of integers, got {value!r}")
    return list(value)


def _variants(raw: Any, where: str) -> dict[str, Variant]:
    if not isinstance(raw, dict) or not raw:
        raise SuiteError(f"{where} must map row names to {{model: ..., sets: [...]}}")
    out = {}
    for name, spec in raw.items():
        at = f"{where}[{name!r}]"
        if not isinstance(spec, dict) or "model" not in spec:
            raise SuiteError(f"{at} needs a model (one of {', '.join(MODEL_FAMILIES)})")
        unknown = sorted(set(spec) - set(VARIANT_KEYS))
        if unknown:
            raise SuiteError(f"{at}: unknown key {', '.join(unknown)}; known: {', '.join(VARIANT_KEYS)}")
        if spec["model"] not in MODEL_FAMILIES:
            raise SuiteError(f"{at}: model {spec['model']!r} is not one of {', '.join(MODEL_FAMILIES)}")
        if spec.get("size", "base") not in SIZES:
            raise SuiteError(f"{at}: size {spec['size']!r} is not one of {', '.join(SIZES)}")
        out[str(name)] = Variant(spec["model"], tuple(_strings(spec.get("sets", []), f"{at}.sets")), spec.get("size", "base"), spec.get("protocol"))
    return out


def suite_from_dict(name: str, raw: Any, where: str) -> Suite:
    """Build and check a :class:`Suite` from a parsed suite file (``where`` names it in errors)."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{where} must hold a mapping (description:, datasets:, variants:, ...)")
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise SuiteError(f"{where}: unknown key {', '.join(unknown)}; known: {', '.join(SUITE_KEYS)}")
    if "datasets" not in raw or "variants" not in raw:
        raise SuiteError(f"{where} needs datasets: and variants:")
    extra = []
    for i, group in enumerate(raw.get("extra") or []):
        if not isinstance(group, dict) or set(group) != {"datasets", "variants"}:
            raise SuiteError(f"{where}: extra[{i}] must hold exactly datasets: and variants:")
        at = f"{where}: extra[{i}]"
        extra.append((tuple(_strings(group["datasets"], f"{at}.datasets")), _variants(group["variants"], f"{at}.variants")))
    return Suite(
        name=name,
        datasets=_strings(raw["datasets"], f"{where}: datasets"),
        variants=_variants(raw["variants"], f"{where}: variants"),
        seeds=_ints(raw.get("seeds", [0, 1, 2]), f"{where}: seeds"),
        protocol=str(raw.get("protocol", "loo-val")),
        description=str(raw.get("description", "")),
        extra=extra,
        sets=_strings(raw.get("sets", []), f"{where}: sets"),
        model_sets={m: _strings(v, f"{where}: model_sets.{m}") for m, v in (raw.get("model_sets") or {}).items()},
        model_seeds={m: _ints(v, f"{where}: model_seeds.{m}") for m, v in (raw.get("model_seeds") or {}).items()},
    )


def load_suite(path: str | Path) -> Suite:
    """One suite from its YAML file; the suite is named after the file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise SuiteError(f"cannot read suite file {p}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SuiteError(f"suite file {p} is not valid YAML: {yaml_problem(exc)}") from exc
    return suite_from_dict(p.stem, raw, str(p))


def load_suites(folder: Path = SUITES_DIR) -> dict[str, Suite]:
    """Every ``*.yaml`` suite of ``folder``, by name (sorted)."""
    return {p.stem: load_suite(p) for p in sorted(folder.glob("*.yaml"))}


SUITES: dict[str, Suite] = load_suites()
