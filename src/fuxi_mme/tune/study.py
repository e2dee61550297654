"""``fuxi-mme tune``: a hyperparameter search on the validation split (docs/training.md#tuning).

Each trial is a ``fuxi-mme train`` subprocess under ``loo-val`` with the final test switched
off (``eval.final_test=false``); several run at once, spread over the visible GPUs. The study
reads each trial's validation curve as it is written (``metrics.jsonl``) and stops trials the
pruner rejects. The test split is evaluated once, for the winner alone, from its best
checkpoint. The study folder holds everything needed to continue after a kill::

    <out>/study.json      what is searched (space, base config, sampler, seed): a rerun must match
    <out>/trials.jsonl    one record per trial event (started, finished); the last one wins
    <out>/trials/<n>/     the trial's run folder and its log
    <out>/results.json, results.md, best.yaml   written as trials finish and at the end
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, validate
from ..experiments.packing import OOM_RETRIES, PackingGate, ended_out_of_memory, host_cores, peak_memory_gb
from ..experiments.plan import visible_gpus
from ..utils.procs import sigterm_as_interrupt, stop_group
from ..utils.runinfo import atomic_write_json, atomic_write_text
from .search import MedianPruner, make_sampler
from .space import Space, apply_params, base_values

log = logging.getLogger("fuxi_mme")
METRIC = "NDCG@10"  # the selection metric of training (train/loop.py)


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    state: str = "running"  # running, complete, pruned, failed
    value: float | None = None  # best validation NDCG@10 (at pruning: the best so far)
    epoch: int | None = None  # the epoch the value comes from
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float | None = None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Budget:
    trials: int = 20
    seconds: float | None = None  # no new trial starts after this many seconds of this invocation
    parallel: int = 1


def _jsonable(cfg: Config) -> dict[str, Any]:
    return json.loads(cfg.to_json())


class Study:
    def __init__(
        self, out: str | Path, base: Config, space: Space, sampler: str = "auto", seed: int = 0, prune: bool = True, keep_checkpoints: bool = False
    ):
        if base.data.protocol != "loo-val":
            raise ConfigError("tune selects on the validation split: use --protocol loo-val (the paper protocol has none)")
        validate(base)
        self.out = Path(out)
        self.base = base
        self.space = {n: p.including(v) for (n, p), v in zip(space.items(), base_values(space, base).values())}
        self.seed = seed
        self.sampler = make_sampler(sampler, self.space, seed)
        self.pruner = MedianPruner() if prune else None
        self.keep_checkpoints = keep_checkpoints
        self.parallel = 1
        self.gate = PackingGate()  # trials start on a GPU when its free memory and the host's idle cores cover one (experiments/packing.py)
        self.oom_retries: dict[int, int] = {}
        self.trials: dict[int, Trial] = {}
        self.spec = {
            "base": _jsonable(base),
            "space": {n: p.describe() for n, p in self.space.items()},
            "sampler": self.sampler.name,
            "seed": seed,
            "prune": prune,
            "metric": f"valid {METRIC}",
        }

    # ---- the study folder
    def _open(self) -> None:
        spec_file = self.out / "study.json"
        if spec_file.exists():
            old = json.loads(spec_file.read_text())
            if {k: v for k, v in old.items() if k != "started"} != self.spec:
                changed = [k for k in self.spec if old.get(k) != self.spec[k]]
                raise ConfigError(
                    f"{self.out} holds a study with another {', '.join(changed)}; continue it with the same arguments, or pass another --out"
                )
            for line in (self.out / "trials.jsonl").read_text().splitlines() if (self.out / "trials.jsonl").exists() else []:
                if line.strip():
                    rec = json.loads(line)
                    self.trials[rec["number"]] = Trial(**{**rec, "curve": [tuple(c) for c in rec.get("curve", [])]})
            for t in sorted(self.trials.values(), key=lambda t: t.number):
                if t.state != "running":
                    self.sampler.tell(t.number, t.params, t.value, t.state)
            log.info("%s: continuing the study (%d trials finished)", self.out, sum(t.state != "running" for t in self.trials.values()))
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(spec_file, {**self.spec, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def _log(self, t: Trial) -> None:
        with open(self.out / "trials.jsonl", "a") as f:
            f.write(json.dumps(t.record()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ---- running trials
    def _next_params(self, number: int) -> dict[str, Any]:
        interrupted = self.trials.get(number)
        if interrupted is not None:  # killed while running: run it again with its parameters
            return interrupted.params
        if number == 0:  # the base config itself, so the search is compared with (and can keep) it
            return base_values(self.space, self.base)
        return self.sampler.ask(number)

    def _launch(self, number: int, gpu: str | None) -> tuple[Trial, subprocess.Popen, Path] | None:
        params = self._next_params(number)
        t = Trial(number, params)
        folder = self.out / "trials" / f"{number:03d}"
        run_dir = folder / "run"
        try:
            cfg = apply_params(self.base, params)
            cfg.eval.final_test = False
            cfg.log.run_dir, cfg.log.progress = str(run_dir), False
            validate(cfg)
        except ConfigError as exc:  # a combination the model refuses (e.g. streams that do not divide the width)
            t.state, t.error = "failed", str(exc)
            self._finish(t)
            return None
        if folder.exists():
            import shutil

            shutil.rmtree(folder)  # an interrupted attempt: start it cleanly
        folder.mkdir(parents=True)
        atomic_write_text(folder / "config.yaml", yaml.safe_dump(_jsonable(cfg), sort_keys=False))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // self.parallel)))  # trials share the host's cores
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = [sys.executable, "-m", "fuxi_mme", "train", "--config", str(folder / "config.yaml"), "--no-progress"]
        with open(folder / "log.txt", "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.trials[number] = t
        self._log(t)
        log.info("trial %d started%s: %s", number, f" on GPU {gpu}" if gpu is not None else "", _short(params))
        return t, proc, run_dir

    def _finish(self, t: Trial) -> None:
        self.trials[t.number] = t
        self._log(t)
        self.sampler.tell(t.number, t.params, t.value, t.state)
        shown = f"{METRIC} {t.value:.4f} (epoch {t.epoch})" if t.value is not None else (t.error or "")
        log.info("trial %d %s: %s", t.number, t.state, shown)
        if not self.keep_checkpoints:
            self._drop_checkpoints()
        self.write_results()

    def _drop_checkpoints(self) -> None:
        """Finished trials keep no checkpoints except the best trial's best-validation one (the
        test split and ``best.yaml``'s users need no other): a study's disk use stays one run's."""
        import shutil

        best = self.best()
        for t in self.trials.values():
            if t.state == "running":
                continue
            ckpt = self.out / "trials" / f"{t.number:03d}" / "run" / "checkpoints"
            if not ckpt.is_dir():
                continue
            for f in ckpt.iterdir():
                if best is None or t.number != best.number or not f.name.startswith("best"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()

    def _finished_curves(self, epoch: int) -> list[list[tuple[int, float]]]:
        done = [t for t in self.trials.values() if t.curve and (t.state == "complete" or (t.state == "pruned" and t.curve[-1][0] >= epoch))]
        return [t.curve for t in done]

    def run(self, budget: Budget) -> dict[str, Any]:
        """Run trials until ``budget`` is spent. Killed (SIGTERM, Ctrl-C), it stops its running
        trials first; they stay ``running`` in trials.jsonl and the same command reruns them."""
        self._open()
        running: dict[int, tuple[Trial, subprocess.Popen, Path, str | None, float]] = {}
        began = time.monotonic()
        try:
            with sigterm_as_interrupt():
                return self._run(budget, running)
        except KeyboardInterrupt:
            for _t, proc, *_ in running.values():
                stop_group(proc)
            log.warning("interrupted: %d running trial(s) stopped; the same command continues the study", len(running))
            self.write_results()
            raise
        finally:
            with open(self.out / "invocations.jsonl", "a") as f:  # the study's wall time, over every invocation
                f.write(json.dumps({"ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.monotonic() - began, 1)}) + "\n")
            self.write_results()

    def _run(self, budget: Budget, running: dict[int, tuple[Trial, subprocess.Popen, Path, str | None, float]]) -> dict[str, Any]:
        from ..data import load_dataset

        start = time.monotonic()
        self.parallel = budget.parallel
        load_dataset(self.base.data)  # prepared once here, not by every trial at once (and a data error stops the study now)
        gpus = visible_gpus()
        todo = [n for n in range(budget.trials) if n not in self.trials or self.trials[n].state == "running"]
        while todo or running:
            while todo and len(running) < budget.parallel and (budget.seconds is None or time.monotonic() - start < budget.seconds):
                gpu = min(gpus, key=lambda g: sum(r[3] == g for r in running.values())) if gpus else None
                if not self.gate.try_acquire(gpu, "trial"):  # its free memory does not cover a trial yet
                    break
                n = todo.pop(0)
                launched = self._launch(n, gpu)
                if launched is not None:
                    running[n] = (*launched, gpu, time.monotonic())
                else:
                    self.gate.release(gpu)
            if budget.seconds is not None and time.monotonic() - start >= budget.seconds and todo:
                log.info("time budget of %.0f s spent: no new trials (%d not started; run the same command to continue)", budget.seconds, len(todo))
                todo = []
            if not running:
                break
            time.sleep(1.0)
            for n in list(running):
                t, proc, run_dir, gpu, began = running[n]
                self._read_curve(t, run_dir)
                if proc.poll() is not None:
                    del running[n]
                    self.gate.release(gpu)
                    self.gate.learn("trial", peak_memory_gb(run_dir), host_cores(run_dir))
                    oom = proc.returncode != 0 and gpu is not None and ended_out_of_memory(run_dir.parent / "log.txt")
                    if oom and self.oom_retries.get(n, 0) < OOM_RETRIES:  # another trial grew: run it again later
                        self.oom_retries[n] = self.oom_retries.get(n, 0) + 1
                        self.gate.raise_need("trial")
                        todo.insert(0, n)
                        log.info("trial %d ran out of GPU memory; it starts again when memory frees up", n)
                        continue
                    t.seconds = round(time.monotonic() - began, 1)
                    self._complete(t, proc.returncode, run_dir)
                    if n == 0 and t.state == "failed":  # the base config itself fails: every trial would
                        for _, other, *_ in running.values():
                            stop_group(other)
                        raise RuntimeError(f"the base config (trial 0) failed, so the study stops: {t.error} (log: {run_dir.parent / 'log.txt'})")
                elif self.pruner is not None and t.curve and self.pruner.should_prune(t.curve, self._finished_curves(t.curve[-1][0])):
                    stop_group(proc)
                    self.gate.release(gpu)
                    t.seconds = round(time.monotonic() - began, 1)
                    t.state = "pruned"
                    t.value, t.epoch = max((v, e) for e, v in t.curve)
                    self._finish(t)
                    del running[n]
        return self.write_results()

    def _read_curve(self, t: Trial, run_dir: Path) -> None:
        f = run_dir / "metrics.jsonl"
        if not f.exists():
            return
        curve = []
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if rec.get("kind") == "valid" and METRIC in rec:
                curve.append((int(rec["epoch"]), float(rec[METRIC])))
        t.curve = curve

    def _complete(self, t: Trial, rc: int, run_dir: Path) -> None:
        metrics = run_dir / "metrics.json"
        if rc == 0 and metrics.exists():
            m = json.loads(metrics.read_text())
            t.state, t.value, t.epoch = "complete", float(m["valid_best"][METRIC]), m.get("selected_epoch")
        else:
            tail = (run_dir.parent / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] if (run_dir.parent / "log.txt").exists() else []
            t.state, t.error = "failed", f"exit code {rc}: {tail[0] if tail else 'no output'}"
        self._finish(t)

    # ---- results
    def best(self) -> Trial | None:
        done = [t for t in self.trials.values() if t.state == "complete" and t.value is not None]
        return max(done, key=lambda t: (t.value, -t.number)) if done else None

    def write_results(self, test: dict[str, Any] | None = None) -> dict[str, Any]:
        from .report import render

        best = self.best()
        res: dict[str, Any] = {
            **{k: v for k, v in self.spec.items() if k != "base"},
            "model": self.base.model.name,
            "dataset": self.base.data.name,
            "trials": [t.record() for t in sorted(self.trials.values(), key=lambda t: t.number)],
            "best": best.record() if best else None,
            "baseline": self.trials[0].record() if 0 in self.trials else None,
            "wall_seconds": self._wall_seconds(),
        }
        old = self.out / "results.json"
        if test is None and old.exists():
            test = json.loads(old.read_text()).get("test")
        if test is not None:
            res["test"] = test
        atomic_write_json(old, res)
        atomic_write_text(self.out / "results.md", render(res))
        if best is not None:
            cfg = apply_params(self.base, best.params)
            cfg.log.run_dir = None
            atomic_write_text(self.out / "best.yaml", yaml.safe_dump(_jsonable(cfg), sort_keys=False))
        return res

    def _wall_seconds(self) -> float:
        f = self.out / "invocations.jsonl"
        lines = f.read_text().splitlines() if f.exists() else []
        return round(sum(json.loads(line)["seconds"] for line in lines if line.strip()), 1)

    def test_best(self, device: str = "auto") -> dict[str, Any] | None:
        """The test split, once, for the winner (its best-validation checkpoint)."""
        from ..runs import evaluate_run

        best = self.best()
        if best is None:
            return None
        old = self.out / "results.json"
        done = json.loads(old.read_text()).get("test") if old.exists() else None
        if done and done.get("trial") == best.number:
            return done  # this winner was tested by an earlier invocation: once is enough
        run_dir = self.out / "trials" / f"{best.number:03d}" / "run"
        if not (run_dir / "checkpoints" / "best").exists():
            log.warning("trial %d's checkpoint is gone (%s); its test split is not evaluated", best.number, run_dir)
            return None
        res = evaluate_run(run_dir, "test", "best", device)
        test = {"trial": best.number, **{k: v for k, v in res["test"].items() if isinstance(v, (int, float))}}
        self.write_results(test)
        return test


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}" for k, v in params.items())
