"""The training loop: epochs of sampled-softmax steps, evaluation, selection, checkpoints.

Model selection follows the protocol (docs/models.md#evaluation-protocols):
* ``loo-val``: evaluate validation every ``eval_every`` epochs, keep the best checkpoint by
  validation NDCG@10, stop after ``patience`` evaluations without improvement, then evaluate
  test once with the best checkpoint.
* ``paper``: train the fixed number of epochs and report the final epoch on test. A per-epoch
  test curve can be logged (``eval.log_test_curve``), labelled as such, never used to choose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from importlib.util import find_spec as importlib_find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data.prepared import PreparedDataset
from ..data.splits import EvalArrays, TrainArrays, eval_arrays, length_sorted_chunks, to_batch, train_arrays
from ..eval.evaluator import autocast_dtype, evaluate_split, model_scorer, resolve_history
from ..models.common import SequenceModel
from ..models.moe import MoE, one_batch_of_routing, release_aux_graphs
from . import distributed as D
from .checkpoint import config_fingerprint, load_state, load_weights, optimizer_state, save_checkpoint
from .graphs import GraphedStep, graphs_wanted, slow_compile_warning
from .loss import negatives_per_position, sample_negatives, sampled_softmax_loss

log = logging.getLogger(__name__)
SELECT_METRIC = "NDCG@10"


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=fused)


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    t = cfg.train
    warm = max(t.warmup_steps, 0)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if t.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total_steps - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class MetricsLog:
    """Append-only JSON-lines log (``metrics.jsonl``), plus optional TensorBoard scalars."""

    def __init__(self, path: Path | None, tensorboard: bool = False):
        self.path = path
        self.tb = None
        if path is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; pip install tensorboard (or fuxi-mme[tensorboard])")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)


class _Step(torch.nn.Module):
    """What DistributedDataParallel wraps: user vectors and item vectors in one forward."""

    def __init__(self, model: SequenceModel, fwd):
        super().__init__()
        self.model = model
        self.fwd = fwd

    def forward(self, ids, ts, query_ts):
        return self.fwd(ids, ts, query_ts), self.model.item_vectors()


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps done
    best_value: float = -1.0
    best_epoch: int = -1
    bad_evals: int = 0
    stopped_early: bool = False


def length_chunks(cfg: Config, device: torch.device, distributed: bool) -> int:
    """How many length-sorted chunks the eager step runs a batch in (``train.length_chunks``)."""
    v = str(cfg.train.length_chunks)
    if v != "auto":
        return int(v)
    if device.type != "cpu" or distributed:
        return 1
    # chunks of at least 16 rows, at most 6: on the ML-1M shape (2 cores) whole epochs took
    # 68 s in one pass, 54.5 s in 4 chunks, 49.3 s in 6 and 49.6 s in 8
    return max(1, min(6, cfg.train.batch_size // 16))


def compile_mode(cfg: Config, device: torch.device, distributed: bool) -> str | None:
    """``train.compile`` resolved: "always" (every step compiled), "graphs" (only the CUDA-graph
    step: ``auto`` on single-process CUDA with CUDA graphs wanted and triton importable, unless
    ``train.deterministic``: Inductor's scatter kernels add atomically) or None."""
    c = cfg.train.compile
    m = cfg.model
    # Measured on the H200 (torch 2.11): Fuxi-MME with the experts on u, dropout on, compiled
    # and recorded in CUDA graphs trains far worse (demo, seeds 1 and 2: loss about 4.1 after
    # 5 epochs against 2.2 eager or compiled without graphs; dropout off trains normally). The
    # cause is not found; auto leaves that combination uncompiled (docs/training.md).
    u_dropout = m.name == "fuxi-mme" and m.moe.num_experts > 0 and m.moe.placement == "u" and m.dropout > 0
    if c is True:
        if u_dropout and device.type == "cuda" and cfg.train.cuda_graphs != "off":
            log.warning("train.compile=true with model.moe.placement=u, dropout and CUDA graphs trains badly on the GPU (docs/training.md); "
                        "use train.compile=auto or train.cuda_graphs=off")
        return "always"
    if c is False or device.type != "cuda" or distributed or cfg.train.cuda_graphs == "off" or cfg.train.deterministic:
        return None
    if u_dropout:
        log.info("train.compile=auto: not compiling (model.moe.placement=u with dropout trains badly compiled inside CUDA graphs; docs/training.md)")
        return None
    return "graphs" if importlib_find_spec("triton") is not None else None


# The Inductor setting that avoids a known compile hang in MoE models; the environment variable
# that sets it (a user's explicit value wins)
PERSISTENT_REDUCTIONS = "triton.persistent_reductions"
PERSISTENT_REDUCTIONS_ENV = "TORCHINDUCTOR_PERSISTENT_REDUCTIONS"


def inductor_options(model: torch.nn.Module) -> dict[str, object] | None:
    """``torch.compile`` options for ``model``: persistent reductions off when it has MoE layers.

    On an H200 (torch 2.11, triton 3.6) NVIDIA's ``ptxas`` never returned on the persistent
    reduction that Inductor made of four MoE layers' router statistics (Fuxi-MME, 4 layers, 4
    streams; benchmarks/results/compile-hang-NVIDIA_H200.md); with persistent reductions off
    the same run compiled and trained. None (Inductor's defaults) for models without MoE, when
    ``TORCHINDUCTOR_PERSISTENT_REDUCTIONS`` is set (the user's choice stands), or when this
    torch has no such setting."""
    if os.environ.get(PERSISTENT_REDUCTIONS_ENV) is not None:
        return None
    if not any(isinstance(m, MoE) for m in model.modules()):
        return None
    try:
        import torch._inductor.config as inductor_config

        if PERSISTENT_REDUCTIONS not in inductor_config._config:
            return None
    except Exception:  # no Inductor in this build: torch.compile will say so itself
        return None
    return {PERSISTENT_REDUCTIONS: False}


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
        self.cfg, self.ds, self.device, self.run_dir = cfg, ds, device, run_dir
        self.dist = dist_info
        self.model = model
        self.compile = compile_mode(cfg, device, dist_info.enabled)
        self._stepped = False  # an eager step has run (under train.compile=true the first one compiles)
        compiled = None
        if self.compile:
            options = inductor_options(model)
            if options:
                log.info("torch.compile with Inductor's persistent reductions off (MoE layers: a known ptxas hang otherwise; docs/training.md)")
            compiled = torch.compile(model, options=options)
        self.step_module: torch.nn.Module = _Step(model, compiled if self.compile == "always" else model)
        # what the CUDA-graph step records: the compiled model under train.compile=auto too
        self.graph_module: torch.nn.Module = _Step(model, compiled) if compiled is not None else self.step_module
        if dist_info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            D.broadcast_module(model, dist_info)  # identical start even if seeds were not
            self.step_module = DDP(
                self.step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                # the loop back end skips an expert that gets no tokens; the batched one never does
                find_unused_parameters=cfg.model.moe.num_experts > 0 and cfg.model.moe.backend == "loop",
            )
        self.train_arrs: TrainArrays = train_arrays(ds, cfg.data.protocol, cfg.data.max_len)
        if len(self.train_arrs) == 0:
            raise ValueError(f"{ds.name}: no user has 2 or more training items under protocol {cfg.data.protocol!r}; nothing to train on")
        self.valid_arrs: EvalArrays | None = eval_arrays(ds, cfg.data.protocol, "valid", cfg.data.max_len) if cfg.data.protocol == "loo-val" else None
        self.test_arrs: EvalArrays = eval_arrays(ds, cfg.data.protocol, "test", cfg.data.max_len)
        t = cfg.train
        self.steps_per_epoch = math.ceil(len(self.train_arrs) / t.batch_size)
        total = self.steps_per_epoch * t.epochs // t.grad_accum
        self.opt = build_optimizer(model, cfg)
        self.sched = build_scheduler(self.opt, cfg, total)
        self.neg_gen = torch.Generator(device=device)
        self.neg_gen.manual_seed(t.seed + 1)
        self.state = TrainState()
        self.progress = progress and dist_info.main
        self.amp_dtype = autocast_dtype(t.amp)
        self.metrics_log = MetricsLog(run_dir / "metrics.jsonl" if run_dir and dist_info.main else None, cfg.log.tensorboard)
        self.fingerprint = config_fingerprint(cfg.to_dict())
        self.history, self.history_reason = resolve_history(cfg.eval.history, ds, cfg.data.protocol)
        if dist_info.main:
            log.info(self.history_reason)
        self.length_chunks = length_chunks(cfg, device, dist_info.enabled)  # read by GraphedStep
        self.graphed: GraphedStep | None = GraphedStep(self) if graphs_wanted(self) else None

    # ------------------------------------------------------------------ steps
    def _epoch_order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 100003 + epoch)
        return torch.randperm(len(self.train_arrs), generator=g).numpy()

    def _batch(self, rows: np.ndarray, negs: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """This rank's part of the global batch ``rows``, its negatives and the loss normaliser.

        ``batch["positions"]`` holds the flat indices of the positions that have a target,
        computed on the host (no device sync): the loss is evaluated there only, so padding
        costs nothing in the loss. The negatives are drawn for the whole padded global batch
        (the same draws whatever the number of ranks) and then picked at those positions.
        """
        t, w = self.cfg.train, self.dist
        n = int(self.train_arrs.lengths[rows].max())
        if negs is None:
            negs = sample_negatives((len(rows), n, negatives_per_position(t)), self.ds.num_items, self.device, self.neg_gen)
        mine = rows[w.rank :: w.world] if w.enabled else rows
        batch = to_batch(self.train_arrs, mine, self.device, width=n)
        flat = np.flatnonzero(self.train_arrs.targets[mine, :n].reshape(-1))
        batch["positions"] = torch.from_numpy(flat).to(self.device, non_blocking=True)
        if not w.enabled:
            return batch, negs, float(len(flat))
        # mean over the global batch's target positions; DDP averages gradients over ranks
        count = float(np.count_nonzero(self.train_arrs.targets[rows, :n])) / w.world
        return batch, negs[w.rank :: w.world], count

    def _loss(self, batch: dict[str, torch.Tensor], negs: torch.Tensor, normalizer: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.cfg.train
        watch, self._stepped = self.compile == "always" and not self._stepped, True  # the first step is the one that compiles
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None), slow_compile_warning(watch):
            user, items = self.step_module(batch["ids"], batch["ts"], batch["query_ts"])
            loss = sampled_softmax_loss(user, batch["targets"], items, negs, t.temperature, normalizer=normalizer, positions=batch.get("positions"), full=t.loss == "full")
        aux = self.model.aux_loss()
        return loss, aux

    def loss_for_rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss (and MoE aux loss) of the global batch ``rows`` of the training arrays (eager)."""
        return self._loss(*self._batch(rows))

    def forward_backward(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Loss and aux loss of the global batch ``rows``, gradients (scaled by 1/grad_accum)
        accumulated into ``.grad``: replayed from a CUDA graph where possible, else eager."""
        if self.graphed is not None:
            out = self.graphed.run(rows)
            if out is not None:
                return out
        if self.length_chunks > 1 and len(rows) >= 2 * self.length_chunks:
            return self._forward_backward_by_length(rows)
        loss, aux = self.loss_for_rows(rows)
        total = loss + aux if aux is not None else loss
        (total / self.cfg.train.grad_accum).backward()
        release_aux_graphs(self.model)  # nothing of this step's autograd graph outlives it
        return loss.detach(), (aux.detach() if aux is not None else None)

    def _forward_backward_by_length(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's rows sorted by length and run in ``length_chunks`` chunks, each padded
        only to its own longest sequence. Sequences are left-aligned and causal and nothing in
        a model mixes rows, so every row's outputs are those of the full-width batch; each
        chunk's loss is divided by the whole batch's target count, and an MoE's balance loss and
        statistics come from the routing of all chunks together (``one_batch_of_routing``); one
        backward pass follows. So the loss, aux loss and gradients are the single pass's. The
        negatives are drawn once for the whole batch, as the single pass draws them, and sliced
        per chunk; only the dropout masks come from different random numbers. Padding is about
        a third of an ML-1M batch's positions."""
        lengths = self.train_arrs.lengths[rows]
        n, K = int(lengths.max()), negatives_per_position(self.cfg.train)
        negs = sample_negatives((len(rows), n, K), self.ds.num_items, self.device, self.neg_gen)
        count = float(np.count_nonzero(self.train_arrs.targets[rows]))
        losses = []
        with one_batch_of_routing(self.model):
            for idx in length_sorted_chunks(lengths, self.length_chunks):
                width = int(lengths[idx].max())
                batch, part_negs, _ = self._batch(rows[idx], negs[torch.from_numpy(idx).to(self.device), :width])
                losses.append(self._loss(batch, part_negs, count)[0])
        loss = torch.stack(losses).sum()
        aux = self.model.aux_loss()  # of the whole batch's routing, set when the block ended
        ((loss + aux if aux is not None else loss) / self.cfg.train.grad_accum).backward()
        release_aux_graphs(self.model)
        return loss.detach(), (aux.detach() if aux is not None else None)

    def zero_grad(self) -> None:
        # graphs write into the existing .grad tensors, so those are zeroed, never dropped
        self.opt.zero_grad(set_to_none=self.graphed is None)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t = self.cfg.train
        fail = os.environ.get("FUXI_MME_TEST_FAIL")  # "RANK:EPOCH": simulate a crashed rank (tests only)
        if fail and fail == f"{self.dist.rank}:{epoch + 1}":
            os._exit(3)
        self.model.train()
        order = self._epoch_order(epoch)
        sum_loss = torch.zeros((), device=self.device)
        sum_aux = torch.zeros((), device=self.device)
        n_batches, n_seq, t0 = 0, 0, time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", leave=False, dynamic_ncols=True)
        self.zero_grad()
        for i in range(self.steps_per_epoch):
            rows = order[i * t.batch_size : (i + 1) * t.batch_size]
            if len(rows) < self.dist.world:  # a final scrap smaller than the number of ranks
                continue
            update = (i + 1) % t.grad_accum == 0 or i + 1 == self.steps_per_epoch
            sync = self.step_module.no_sync() if self.dist.enabled and not update else contextlib.nullcontext()
            with sync:
                loss, aux = self.forward_backward(rows)
            if update:
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.opt.step()
                self.sched.step()
                self.zero_grad()
                self.state.step += 1
            sum_loss += loss.detach()
            if aux is not None:
                sum_aux += aux.detach()
            n_batches += 1
            n_seq += len(rows)
            if bar is not None:
                bar.update(1)
                if (i + 1) % 20 == 0 or i + 1 == self.steps_per_epoch:
                    bar.set_postfix(loss=f"{(sum_loss / n_batches).item():.4f}", seq_s=f"{n_seq / (time.perf_counter() - t0):.0f}")
            if t.max_steps is not None and self.state.step >= t.max_steps:
                break
        if bar is not None:
            bar.close()
        if self.dist.enabled:  # rank r's loss is world x its share of the global mean
            D.all_reduce_sum(sum_loss, self.dist)
            D.all_reduce_sum(sum_aux, self.dist)
            sum_loss /= self.dist.world
            sum_aux /= self.dist.world
        dt = time.perf_counter() - t0
        rec = {
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
        e, w = self.cfg.eval, self.dist
        gather = (lambda obj: D.all_gather_objects(obj, w)) if w.enabled else None
        return evaluate_split(model_scorer(self.model, self.amp_dtype), arrs, self.ds, split=split, history=self.history, ks=e.ks,
                              batch_size=e.batch_size, device=self.device, rank=w.rank, world=w.world, gather=gather)

    # ------------------------------------------------------------------ checkpoints
    def _rng(self) -> dict[str, torch.Tensor]:
        rng = {"torch": torch.get_rng_state(), "neg": self.neg_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self, tag: str, resumable: bool) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        state = {**self.state.__dict__, "fingerprint": self.fingerprint, "scheduler": self.sched.state_dict()}
        save_checkpoint(self.run_dir / "checkpoints" / tag, self.model, state, self.opt if resumable else None, self._rng() if resumable else None)

    def restore(self, folder: Path) -> None:
        from .checkpoint import CheckpointError, remove_leftovers, resolve_checkpoint, truncate_metrics_log

        folder = resolve_checkpoint(folder)  # <tag>.old when a save was killed between its renames
        state, tensors = load_state(folder)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"checkpoint {folder} was written with a different model or data config; resume needs the same config")
        load_weights(folder, self.model, self.device)
        self.opt.load_state_dict(optimizer_state(state, tensors))
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.neg_gen.set_state(tensors["rng.neg"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        for k in TrainState.__dataclass_fields__:
            setattr(self.state, k, state[k])
        if self.run_dir is not None and self.dist.main:  # what a killed run left after this checkpoint
            remove_leftovers(folder.parent)
            truncate_metrics_log(self.run_dir / "metrics.jsonl", self.state.epoch)

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        t, proto = self.cfg.train, self.cfg.data.protocol
        valid_best: dict[str, float] | None = None
        while self.state.epoch < t.epochs and not self.state.stopped_early:
            epoch = self.state.epoch
            rec = self.train_epoch(epoch)
            self.state.epoch += 1
            msg = f"epoch {epoch + 1}: loss {rec['loss']:.4f}, {rec['seq_per_s']:.0f} seq/s"
            if self.state.epoch % t.eval_every == 0 or self.state.epoch == t.epochs:
                if self.valid_arrs is not None:
                    vm = self.evaluate(self.valid_arrs, "valid")
                    self.metrics_log.write({"kind": "valid", "epoch": self.state.epoch, "step": self.state.step, **vm})
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
                    self.metrics_log.write({"kind": "test_curve", "note": "per-epoch test curve; never used for selection", "epoch": self.state.epoch, **tm})
                    msg += f", test-curve {SELECT_METRIC} {tm[SELECT_METRIC]:.4f}"
            log.info(msg)
            self.save("last", resumable=True)
            if t.max_steps is not None and self.state.step >= t.max_steps:
                break
        # ---- final test, once
        if proto == "loo-val" and self.run_dir is not None and self.state.best_epoch > 0:
            if self.dist.main:
                load_weights(self.run_dir / "checkpoints" / "best", self.model, self.device)
            D.broadcast_module(self.model, self.dist)  # other ranks need no shared file system
            selected = self.state.best_epoch
        else:
            selected = self.state.epoch
        test = self.evaluate(self.test_arrs, "test")
        self.metrics_log.write({"kind": "test", "epoch": selected, "step": self.state.step, **test})
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
