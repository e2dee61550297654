"""Which configuration to try next, and when to stop a trial early.

Two samplers behind one interface: Optuna's TPE when ``optuna`` is installed (the optional
``fuxi-mme[tune]`` extra), else a seeded random search. Both see the finished trials (also
those of an earlier, interrupted invocation), so a resumed study continues where it stopped.
Pruning is one rule for both (:class:`MedianPruner`), applied by the study to the validation
curve each trial writes.
"""

from __future__ import annotations

import random
import statistics
import zlib
from typing import Any

from .space import Param, Space


def optuna_available() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


class RandomSampler:
    """Trial ``i``'s parameters depend on (seed, i) alone: a resumed study draws the same ones."""

    name = "random"

    def __init__(self, space: Space, seed: int):
        self.space, self.seed = space, seed

    def tell(self, number: int, params: dict[str, Any], value: float | None, state: str) -> None:
        pass  # a random search learns nothing from results

    def ask(self, number: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{number}")
        return {name: p.sample(rng) for name, p in self.space.items()}


class OptunaSampler:
    """Optuna's TPE sampler (seeded) over the same space, through its ask-and-tell interface.
    Trial ``i`` is drawn by a sampler seeded with (seed, i), from the trials told so far: a
    resumed study, which reruns an interrupted trial with its recorded parameters without asking,
    draws the next trial as the uninterrupted study would (one sampler's stream would be one draw
    behind and repeat the interrupted trial's parameters)."""

    name = "optuna-tpe"

    def __init__(self, space: Space, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.dists = {name: _distribution(optuna, p) for name, p in space.items()}
        self.seed = seed
        self.study = optuna.create_study(direction="maximize")  # its sampler: set per trial by ask()
        self.pending: dict[int, Any] = {}

    def tell(self, number: int, params: dict[str, Any], value: float | None, state: str) -> None:
        """A finished trial (this run's or an earlier invocation's) informs later samples."""
        st = self.optuna.trial.TrialState
        states = {"complete": st.COMPLETE, "pruned": st.PRUNED}
        known = {k: v for k, v in params.items() if k in self.dists}
        trial = self.pending.pop(number, None)
        if trial is not None:
            if state in states and value is not None:
                self.study.tell(trial, value if state == "complete" else None, state=states[state])
            else:
                self.study.tell(trial, state=st.FAIL)
            return
        if state in states and value is not None and len(known) == len(self.dists):
            self.study.add_trial(
                self.optuna.trial.create_trial(
                    params=known, distributions=self.dists, value=value if state == "complete" else None, state=states[state]
                )
            )

    def ask(self, number: int) -> dict[str, Any]:
        self.study.sampler = self.optuna.samplers.TPESampler(seed=zlib.crc32(f"{self.seed}:{number}".encode()))
        trial = self.study.ask(self.dists)
        self.pending[number] = trial
        return dict(trial.params)


def _distribution(optuna: Any, p: Param) -> Any:
    d = optuna.distributions
    if p.choices is not None:
        return d.CategoricalDistribution(list(p.choices))
    if p.integer:
        return d.IntDistribution(int(p.low), int(p.high))  # type: ignore[arg-type]
    return d.FloatDistribution(float(p.low), float(p.high), log=p.log)  # type: ignore[arg-type]


def make_sampler(kind: str, space: Space, seed: int) -> RandomSampler | OptunaSampler:
    """``auto``: Optuna when installed, else random; ``optuna`` without it is an error."""
    if kind == "optuna" or (kind == "auto" and optuna_available()):
        if not optuna_available():
            from ..config import ConfigError

            raise ConfigError("--sampler optuna needs the optuna package: pip install 'fuxi-mme[tune]' (or --sampler random)")
        return OptunaSampler(space, seed)
    return RandomSampler(space, seed)


class MedianPruner:
    """Stop a trial whose best validation value so far is below the median of the finished
    trials' best values at the same epoch (each finished trial's curve held at its last value
    after it stopped). Applies after ``warmup`` evaluations and once ``min_trials`` trials
    have finished, so the first trials always run to the end."""

    def __init__(self, warmup: int = 5, min_trials: int = 4):
        self.warmup, self.min_trials = warmup, min_trials

    def should_prune(self, curve: list[tuple[int, float]], finished: list[list[tuple[int, float]]]) -> bool:
        """``curve``: (epoch, value) of the running trial; ``finished``: the finished ones'."""
        if len(curve) < self.warmup or len(finished) < self.min_trials:
            return False
        epoch = curve[-1][0]
        best = max(v for _, v in curve)
        others = [b for b in (_best_until(c, epoch) for c in finished) if b is not None]
        if len(others) < self.min_trials:
            return False
        return best < statistics.median(others)


def _best_until(curve: list[tuple[int, float]], epoch: int) -> float | None:
    seen = [v for e, v in curve if e <= epoch]
    return max(seen) if seen else None
