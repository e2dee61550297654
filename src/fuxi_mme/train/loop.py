"""The training loop: epochs of sampled-softmax steps, evaluation, selection, checkpoints.

Model selection follows the protocol (docs/models.md#evaluation-protocols):
* ``loo-val``: evaluate validation every ``eval_every`` epochs, keep the best checkpoint by
  validation NDCG@10, stop after ``patience`` evaluations without improvement, then evaluate
  test once with the best checkpoint.
* ``paper``: train the fixed number of epochs and report the final epoch on test. A per-epoch
  test curve can be logged (``eval.log_test_curve``), labelled as such, never used to choose.

Every step goes through :func:`~fuxi_mme.train.step.loss_and_backward`: eagerly on one batch,
on its length-sorted chunks, or recorded in a CUDA graph (:class:`~fuxi_mme.train.graphs.GraphedStep`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..data.batches import NegativeSampler, make_batch
from ..data.noise import evaluation_view, training_view
from ..data.prepared import PreparedDataset
from ..data.splits import EvalArrays, TrainArrays, eval_arrays, length_sorted_chunks, train_arrays
from ..eval.evaluator import evaluate_run_split, model_scorer, resolve_history
from ..models.common import SequenceModel
from ..utils.runtime import autocast_dtype
from . import distributed as D
from . import sharding
from .checkpoint import (
    CheckpointError,
    CheckpointWriter,
    config_fingerprint,
    load_state,
    load_weights,
    optimizer_state,
    read_weights,
    remove_leftovers,
    resolve_checkpoint,
    truncate_metrics_log,
)
from .graphs import GraphedStep, StepVariant, graphs_wanted, slow_compile_warning
from .loss import negatives_per_position
from .setup import MetricsLog, build_optimizer, build_scheduler, compile_mode, length_chunks
from .step import StepSettings, batch_loss, loss_and_backward

log = logging.getLogger(__name__)
SELECT_METRIC = "NDCG@10"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: training stops, the last good checkpoint stays."""


class _Step(torch.nn.Module):
    """What DistributedDataParallel wraps: user vectors and item vectors in one forward."""

    def __init__(self, model: SequenceModel, fwd):
        super().__init__()
        self.model = model
        self.fwd = fwd

    def forward(self, ids, ts, query_ts, behaviors=None):
        user = self.fwd(ids, ts, query_ts) if behaviors is None else self.fwd(ids, ts, query_ts, behaviors)
        if self.shared is not None:  # the chunks of one batch: one item table and one backward through it
            if self.shared.get("items") is None:
                self.shared["items"] = self.model.item_vectors()
            return user, self.shared["items"]
        return user, self.model.item_vectors()

    shared: dict | None = None

    @contextlib.contextmanager
    def sharing_items(self):
        """Inside, every forward returns the same item vectors, computed once: the length chunks
        of one batch share them (normalising the whole table per chunk costs O(items) each)."""
        self.shared = {}
        try:
            yield
        finally:
            self.shared = None


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done
    best_value: float = -1.0
    best_epoch: int = -1
    bad_evals: int = 0
    stopped_early: bool = False


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ds: PreparedDataset,
        model: SequenceModel,
        device: torch.device,
        run_dir: Path | None,
        progress: bool = True,
        dist_info: D.DistInfo = D.SINGLE,
    ):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        ds_clean = ds
        self.dist = dist_info
        self.model = model
        t = cfg.train
        # noise and sparsity touch the training part only; evaluation reads the clean histories
        # unless data.noise.eval (docs/training.md#robustness-protocols)
        self.ds = ds = evaluation_view(ds, cfg.data, t.seed)
        self.train_arrs: TrainArrays = train_arrays(training_view(ds_clean, cfg.data, t.seed), cfg.data.protocol, cfg.data.max_len)
        if len(self.train_arrs) == 0:
            raise ValueError(f"{ds.name}: no user has 2 or more training items under protocol {cfg.data.protocol!r}; nothing to train on")
        self.valid_arrs: EvalArrays | None = eval_arrays(ds, cfg.data.protocol, "valid", cfg.data.max_len) if cfg.data.protocol == "loo-val" else None
        self.test_arrs: EvalArrays = eval_arrays(ds, cfg.data.protocol, "test", cfg.data.max_len)
        self.steps_per_epoch = math.ceil(len(self.train_arrs) / t.batch_size)
        gen = torch.Generator(device=device)
        gen.manual_seed(t.seed + 1)
        self.sampler = NegativeSampler(ds.num_items, negatives_per_position(t), gen, device)
        self.state = TrainState()
        self.progress = progress and dist_info.main and sys.stderr.isatty()  # no redraws into a log file
        self.amp_dtype = autocast_dtype(t.amp)
        self.settings = StepSettings(t.temperature, t.loss == "full", self.amp_dtype, 1.0 / t.grad_accum)
        self.metrics_log = MetricsLog(run_dir / "metrics.jsonl" if run_dir and dist_info.main else None, cfg.log.tensorboard)
        self.fingerprint = config_fingerprint(cfg.to_dict())
        self.history, self.history_reason = resolve_history(cfg.eval.history, ds, cfg.data.protocol)
        if dist_info.main:
            log.info(self.history_reason)
        self.length_chunks = length_chunks(cfg, device, dist_info.enabled)
        self.sharded = sharding.wanted(cfg, model, dist_info)  # FSDP2 item tables (docs/training.md#sharded-item-tables)
        self.checkpoints: CheckpointWriter | None = None  # started at the first save
        self._build_steps()
        # built on the parameters as training holds them: under sharding, its state is sharded too
        self.opt = build_optimizer(model, cfg)
        self.sched = build_scheduler(self.opt, cfg, self.steps_per_epoch * t.epochs // t.grad_accum)

    def _build_steps(self) -> None:
        """The eager forward (compiled under train.compile=true, DDP-wrapped or FSDP2-sharded
        under torchrun) and the CUDA-graph step with its variants (compiled first under auto,
        then plain)."""
        cfg, model, dev = self.cfg, self.model, self.device
        self.compile = compile_mode(cfg, model, dev, self.dist.enabled) if not self.sharded else None
        self._stepped = False  # an eager step has run (under train.compile=true the first one compiles)
        compiled = None
        if self.compile:
            options = model.compile_options()
            if options:
                log.info("torch.compile with options %s (the model asks for them; docs/training.md)", options)
            compiled = torch.compile(model, options=options)
        plain = _Step(model, model)
        self.forward_module: torch.nn.Module = _Step(model, compiled) if self.compile == "always" else plain
        if self.sharded:
            self.forward_module = sharding.shard(plain, self.dist, dev)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            D.broadcast_module(model, self.dist)  # identical start even if seeds were not
            self.forward_module = DDP(
                self.forward_module, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=model.has_unused_parameters()
            )
        self._compiled, self._plain = compiled, plain
        self.graphed: GraphedStep | None = None
        if cfg.model.use_behavior and cfg.train.cuda_graphs != "off" and dev.type == "cuda":
            # the static batches of the graph step hold no behaviours (docs/models.md#behaviour-input)
            log.info("model.use_behavior: training eagerly (the CUDA-graph step has no behaviour input yet)")
        elif graphs_wanted(cfg.train.cuda_graphs, dev, self.dist.enabled):
            self.graphed = self.make_graphed_step()

    def make_graphed_step(self, cls: type[GraphedStep] = GraphedStep) -> GraphedStep:
        """The CUDA-graph step over this trainer's arrays, sampler and parameters: the compiled
        forward first (train.compile=auto or true), then the plain one under auto."""
        model, st = self.model, replace(self.settings, autocast_cache=False, padded_positions=True)

        def bound(fwd):
            return lambda batch, norm: loss_and_backward(fwd, model, [batch], norm, st)

        variants = [StepVariant("compiled", bound(_Step(model, self._compiled)), compiled=True)] if self._compiled is not None else []
        if self.compile != "always":
            variants.append(StepVariant("plain", bound(self._plain)))
        chunks = self.length_chunks if model.independent_length_chunks() else 1
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(variants, params, self.train_arrs, self.sampler, self.cfg.train.batch_size, chunks)

    # ------------------------------------------------------------------ steps
    def _epoch_order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 100003 + epoch)
        return torch.randperm(len(self.train_arrs), generator=g).numpy()

    def _batches(self, rows: np.ndarray, chunks: int | None = None):
        """This rank's batches of the global batch ``rows`` (one, or its length chunks) and the
        loss normaliser. The negatives are drawn for the whole padded global batch (the same
        draws whatever the number of ranks or chunks) and picked at the target positions."""
        arrs, w, dev = self.train_arrs, self.dist, self.device
        lengths = arrs.lengths[rows]
        n = int(lengths.max())
        negs = self.sampler.draw(len(rows), n)
        count = float(np.count_nonzero(arrs.targets[rows, :n]))
        chunks = self.length_chunks if chunks is None else chunks
        if chunks > 1 and len(rows) >= 2 * chunks and not w.enabled:
            # each chunk padded only to its own longest row; nothing in a model mixes rows, so
            # every row's outputs are the full-width batch's (about a third of an ML-1M batch is padding)
            parts = length_sorted_chunks(lengths, chunks)
            return [make_batch(arrs, rows[i], dev, width=int(lengths[i].max()), negatives=negs[torch.from_numpy(i).to(dev)]) for i in parts], count
        if not w.enabled:
            return [make_batch(arrs, rows, dev, width=n, negatives=negs)], count
        # mean over the global batch's target positions; DDP averages gradients over ranks
        return [make_batch(arrs, rows[w.rank :: w.world], dev, width=n, negatives=negs[w.rank :: w.world])], count / w.world

    def loss_for_rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss (and aux loss) of the global batch ``rows`` in one eager forward pass (no length
        chunks, no backward): what tests and benchmarks time and compare."""
        (batch,), normalizer = self._batches(rows, chunks=1)
        loss = batch_loss(self.forward_module, batch, normalizer, self.settings)
        return loss, self.model.aux_loss()

    def forward_backward(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss and aux loss of the global batch ``rows``, gradients (scaled by 1/grad_accum)
        accumulated into ``.grad``: replayed from a CUDA graph where possible, else eager."""
        if self.graphed is not None:
            out = self.graphed.run(rows)
            if out is not None:
                return out
        batches, normalizer = self._batches(rows)
        watch, self._stepped = self.compile == "always" and not self._stepped, True  # the first step is the one that compiles
        with slow_compile_warning(watch):
            return loss_and_backward(self.forward_module, self.model, batches, normalizer, self.settings)

    def zero_grad(self) -> None:
        # graphs write into the existing .grad tensors, so those are zeroed, never dropped
        self.opt.zero_grad(set_to_none=self.graphed is None)

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.sched.step()
        self.zero_grad()
        self.state.step += 1

    def _progress_bar(self, epoch: int):
        """A per-step progress bar on a terminal; None when stderr is a file or a pipe (the
        epoch's log line is then the only output)."""
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False, dynamic_ncols=True)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        t = self.cfg.train
        fail = os.environ.get("FUXI_MME_TEST_FAIL")  # "RANK:EPOCH": simulate a crashed rank (tests only)
        if fail and fail == f"{self.dist.rank}:{epoch + 1}":
            os._exit(3)
        self.model.train()
        order = self._epoch_order(epoch)
        sum_loss = torch.zeros((), device=self.device)
        sum_aux = torch.zeros((), device=self.device)
        n_batches, n_seq, t0 = 0, 0, time.perf_counter()
        bar = self._progress_bar(epoch)
        self.zero_grad()
        for i in range(self.steps_per_epoch):
            rows = order[i * t.batch_size : (i + 1) * t.batch_size]
            if len(rows) < self.dist.world:  # a final scrap smaller than the number of ranks
                continue
            update = (i + 1) % t.grad_accum == 0 or i + 1 == self.steps_per_epoch
            # with several ranks, forward_module is the DistributedDataParallel wrapper; sharded
            # (FSDP2), each micro-batch reduce-scatters into the sharded gradients instead
            no_sync = cast("DistributedDataParallel", self.forward_module).no_sync if self.dist.enabled and not self.sharded and not update else None
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                loss, aux = self.forward_backward(rows)
            if update:
                self._optimizer_step()
            sum_loss += loss.detach()
            if aux is not None:
                sum_aux += aux.detach()
            n_batches, n_seq = n_batches + 1, n_seq + len(rows)
            if bar is not None:
                bar.update(1)
                if (i + 1) % 20 == 0 or i + 1 == self.steps_per_epoch:
                    bar.set_postfix(loss=f"{(sum_loss / n_batches).item():.4f}", seq_s=f"{n_seq / (time.perf_counter() - t0):.0f}")
            if t.max_steps is not None and self.state.step >= t.max_steps:
                break
        if bar is not None:
            bar.close()
        return self._epoch_record(epoch, sum_loss, sum_aux, n_batches, n_seq, time.perf_counter() - t0)

    def _epoch_record(self, epoch: int, sum_loss: torch.Tensor, sum_aux: torch.Tensor, n_batches: int, n_seq: int, dt: float) -> dict[str, Any]:
        """The epoch's ``train`` record (losses averaged over ranks), written to the log."""
        if self.dist.enabled:  # rank r's loss is world x its share of the global mean
            D.all_reduce_sum(sum_loss, self.dist)
            D.all_reduce_sum(sum_aux, self.dist)
            sum_loss /= self.dist.world
            sum_aux /= self.dist.world
        rec: dict[str, Any] = {
            "kind": "train",
            "epoch": epoch + 1,
            "step": self.state.step,
            "loss": float(sum_loss / max(n_batches, 1)),
            "lr": self.sched.get_last_lr()[0],
            "seq_per_s": n_seq / dt,
            "epoch_seconds": dt,
        }
        if self.model.aux_loss() is not None or self.model.router_stats():
            rec["aux_loss"] = float(sum_aux / max(n_batches, 1))
            for k, v in self.model.router_stats().items():
                rec[k] = v.tolist() if v.numel() > 1 else float(v)
        if self.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.dist.enabled:
            rec["world_size"] = self.dist.world
        self.metrics_log.write(rec)
        return rec

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, arrs: EvalArrays, split: str) -> dict[str, Any]:
        self.model.eval()
        w = self.dist
        gather = (lambda obj: D.all_gather_objects(obj, w)) if w.enabled else None
        scorer = model_scorer(self.model, self.amp_dtype)
        with sharding.gathered(self.forward_module) if self.sharded else contextlib.nullcontext():
            return evaluate_run_split(scorer, arrs, self.ds, self.cfg, split, self.history, self.device, rank=w.rank, world=w.world, gather=gather)

    # ------------------------------------------------------------------ checkpoints
    def _rng(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "neg": self.sampler.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self, tag: str, resumable: bool) -> None:
        if self.run_dir is None:
            return
        weights: torch.nn.Module | dict[str, torch.Tensor] = self.model
        optim: torch.optim.Optimizer | dict[str, Any] | None = self.opt if resumable else None
        if self.sharded:  # gathered by every rank, written unsharded by rank 0
            weights = sharding.full_model_state(self.model)
            optim = sharding.full_optimizer_state(self.opt, self.dist.main) if resumable else None
        if not self.dist.main:
            return
        state = {**self.state.__dict__, "fingerprint": self.fingerprint, "scheduler": self.sched.state_dict()}
        if self.checkpoints is None:
            self.checkpoints = CheckpointWriter()
        self.checkpoints.submit(self.run_dir / "checkpoints" / tag, weights, state, optim, self._rng() if resumable else None)

    def restore(self, folder: Path) -> None:
        folder = resolve_checkpoint(folder)  # <tag>.old when a save was killed between its renames
        state, tensors = load_state(folder)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"checkpoint {folder} was written with a different model or data config; resume needs the same config")
        if self.sharded:  # every rank reads the full checkpoint and keeps its shards
            sharding.load_model_state(self.model, read_weights(folder, self.model, self.device))
            sharding.load_optimizer_state(self.opt, optimizer_state(state, tensors))
        else:
            load_weights(folder, self.model, self.device)
            self.opt.load_state_dict(optimizer_state(state, tensors))
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.sampler.generator.set_state(tensors["rng.neg"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        for k in TrainState.__dataclass_fields__:
            setattr(self.state, k, state[k])
        if self.run_dir is not None and self.dist.main:  # what a killed run left after this checkpoint
            remove_leftovers(folder.parent)
            truncate_metrics_log(self.run_dir / "metrics.jsonl", self.state.epoch)

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        """Train, select and test (the module docstring); every checkpoint is on disk when it returns
        or raises (they are written in the background: ``checkpoint.CheckpointWriter``)."""
        try:
            out = self._fit()
        except BaseException:
            if self.checkpoints is not None:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    self.checkpoints.close()
            raise
        if self.checkpoints is not None:
            self.checkpoints.close()
        return out

    def _fit(self) -> dict[str, Any]:
        t, proto = self.cfg.train, self.cfg.data.protocol
        valid_best: dict[str, float] | None = None
        while self.state.epoch < t.epochs and not self.state.stopped_early:
            epoch = self.state.epoch
            rec = self.train_epoch(epoch)
            if not math.isfinite(rec["loss"]):
                raise NonFiniteLoss(
                    f"epoch {epoch + 1}: the training loss is {rec['loss']} (not finite); training stopped before saving it, "
                    f"so checkpoints/last still holds epoch {self.state.epoch}. Lower train.lr, set train.grad_clip, or check the data "
                    "and the checkpoint (--resume continues from it)"
                )
            self.state.epoch += 1
            msg = f"epoch {epoch + 1}: loss {rec['loss']:.4f}, {rec['seq_per_s']:.0f} seq/s"
            if self.state.epoch % t.eval_every == 0 or self.state.epoch == t.epochs:
                if self.valid_arrs is not None:
                    t_eval = time.perf_counter()
                    vm = self.evaluate(self.valid_arrs, "valid")
                    t_eval = time.perf_counter() - t_eval  # the run's phase breakdown (run.json) sums these
                    self.metrics_log.write({"kind": "valid", "epoch": self.state.epoch, "step": self.state.step, **vm, "eval_seconds": t_eval})
                    msg += f", valid {SELECT_METRIC} {vm[SELECT_METRIC]:.4f}"
                    if vm[SELECT_METRIC] > self.state.best_value:
                        self.state.best_value, self.state.best_epoch, self.state.bad_evals = vm[SELECT_METRIC], self.state.epoch, 0
                        valid_best = vm
                        self.save("best", resumable=False)
                    else:
                        self.state.bad_evals += 1
                        if t.patience is not None and self.state.bad_evals >= t.patience:
                            self.state.stopped_early = True
                            msg += f" (no improvement for {t.patience} evaluations: stopping)"
                elif self.cfg.eval.log_test_curve:
                    tm = self.evaluate(self.test_arrs, "test")
                    self.metrics_log.write(
                        {"kind": "test_curve", "note": "per-epoch test curve; never used for selection", "epoch": self.state.epoch, **tm}
                    )
                    msg += f", test-curve {SELECT_METRIC} {tm[SELECT_METRIC]:.4f}"
            log.info(msg)
            self.save("last", resumable=True)
            if t.max_steps is not None and self.state.step >= t.max_steps:
                break
        # ---- final test, once
        if self.checkpoints is not None:
            self.checkpoints.wait()  # "best" is read back below; a failed write stops the run here
        if proto == "loo-val" and self.run_dir is not None and self.state.best_epoch > 0:
            best = self.run_dir / "checkpoints" / "best"
            # other ranks need no shared file system: rank 0 reads, the weights are broadcast
            if self.sharded:
                sharding.load_model_state(self.model, read_weights(best, self.model, self.device) if self.dist.main else None, from_rank0=True)
            else:
                if self.dist.main:
                    load_weights(best, self.model, self.device)
                D.broadcast_module(self.model, self.dist)
            selected = self.state.best_epoch
        else:
            selected = self.state.epoch
        test = None
        if self.cfg.eval.final_test:
            t_eval = time.perf_counter()
            test = self.evaluate(self.test_arrs, "test")
            t_eval = time.perf_counter() - t_eval
            self.metrics_log.write({"kind": "test", "epoch": selected, "step": self.state.step, **test, "eval_seconds": t_eval})
        result = {
            "protocol": proto,
            "split": "test",
            "selected_epoch": selected,
            "selection": f"best validation {SELECT_METRIC}" if proto == "loo-val" else "final epoch (paper protocol)",
            "epochs_trained": self.state.epoch,
            "eval_history": {"mode": self.history, "why": self.history_reason},
            "test": test,
        }
        if valid_best is not None or self.state.best_epoch > 0:
            result["valid_best"] = valid_best or {SELECT_METRIC: self.state.best_value}
        return result
