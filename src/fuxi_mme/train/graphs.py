"""CUDA-graph training step: forward, loss and backward replayed from a recorded graph.

At the base presets' sizes a training step launches 400-800 small kernels and the GPU sits idle
most of the step waiting for Python to launch them (``benchmarks/profile_step.py``: 31-44%
busy on ML-1M). A CUDA graph launches the whole recorded step at once.

A graph needs fixed shapes and fixed addresses, so the step works on static buffers:

* the batch is always ``batch_size`` rows at the full width ``max_len`` (the models are causal
  and padding comes last, so the outputs at real positions do not depend on the width);
* the loss is evaluated at the positions that have a target, padded up to a *bucket* of
  positions (padding entries carry target 0 and are masked out, exactly as padding is in the
  eager loss); one graph is recorded per bucket, all sharing one memory pool (they never run
  at the same time);
* negatives are drawn outside the graph with the trainer's generator, as in the eager step
  (the same draws), and copied in.

With ``train.length_chunks`` > 1 (opt-in on a GPU, where it measured slower than one pass)
the batch's rows are sorted by length and run as equal chunks, each at its longest row's width
rounded up to an eighth of ``max_len``: one graph per (width, target bucket), replayed one
after the other into the same gradients, every chunk's loss divided by the whole batch's target
count (a static device scalar). Every graph a step needs is recorded before any is replayed.

Gradients accumulate into ``.grad`` tensors that exist before the first capture and are only
ever zeroed in place afterwards (never set to None). The optimizer step, gradient clipping and
the scheduler stay eager (a handful of fused kernels). Dropout inside the graph draws from
PyTorch's graph-safe generator, so the dropout masks differ from an eager run's; with dropout 0
the losses equal the eager step's to rounding (``tests/test_gpu.py``).

With ``train.compile`` (``auto``: on here when triton is installed) the graphs record the
compiled model's kernels: ``torch.compile`` fuses the norms, SiLU, masks and casts between the
matrix products (ML-20M FuXi-alpha, bf16: step 10.9 -> 6.2 ms on an H200,
``docs/performance.md``). A compiled model that fails to capture is replaced by the plain one.
Each graph is preceded by two warm-up passes: the first unchecked (compilation, lazy
initialisation), the second checked for host syncs.

Not used (eager step instead): CPU, multi-process training, the final partial batch of an
epoch, and any model whose step cannot be captured (e.g. an op that synchronises with the
host); the reason is logged once. A capture that fails half-way releases the CUDA generator
from capture mode, so the eager steps that follow can still draw dropout masks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.batches import Batch, NegativeSampler
from ..data.splits import TrainArrays, length_sorted_chunks

log = logging.getLogger(__name__)

# Seconds of a first compiled call after which a warning names the known compile hang and its
# workaround (compilation normally takes 10-35 s; docs/training.md, train.compile).
SLOW_COMPILE_S = 180.0


@contextlib.contextmanager
def slow_compile_warning(active: bool, seconds: float | None = None):
    """Inside the block (a call that may compile), warn once if it is still running after
    ``seconds``: on an H200 one configuration never finished compiling because ``ptxas`` did
    not return on an Inductor persistent-reduction kernel. Only a log line; nothing is stopped."""
    if not active:
        yield
        return
    seconds = SLOW_COMPILE_S if seconds is None else seconds
    timer = threading.Timer(
        seconds,
        log.warning,
        args=(
            "torch.compile has been running for %.0f s (usually 10-35 s). If it never finishes, a known cause is NVIDIA's ptxas "
            "hanging on one Inductor persistent-reduction kernel (off by default for MoE models): rerun with "
            "TORCHINDUCTOR_PERSISTENT_REDUCTIONS=0 in the environment, or with --set train.compile=false (docs/training.md)",
            seconds,
        ),
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def graphs_wanted(setting: str, device: torch.device, distributed: bool) -> bool:
    """``train.cuda_graphs`` resolved: on for single-process CUDA training unless "off"."""
    if setting == "off":
        return False
    ok = device.type == "cuda" and not distributed
    if setting == "on" and not ok:
        log.warning("train.cuda_graphs=on needs single-process CUDA training; training eagerly")
    return ok


class HostSyncInStep(RuntimeError):
    pass


@contextlib.contextmanager
def _no_host_syncs():
    """Raise :class:`HostSyncInStep` if the body makes the host wait on the GPU."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as e:
        if "synchroniz" in str(e).lower():
            raise HostSyncInStep(f"the training step waits on the GPU ({str(e).splitlines()[0][:120]}), so it cannot be captured") from e
        raise
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _release_rng_from_failed_capture(device: torch.device) -> None:
    """A capture that fails after it began leaves the CUDA generator in capture mode, and the
    next eager random op (dropout) then raises "Offset increment outside graph capture
    encountered unexpectedly". Give the generator a fresh copy of its state (same seed and
    offset, not capturing), so the eager fallback can run."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    gen = torch.cuda.default_generators[idx]
    try:
        gen.graphsafe_set_state(gen.clone_state())
    except (AttributeError, RuntimeError) as e:  # older PyTorch: nothing to release with
        log.debug("could not reset the CUDA generator after a failed capture: %s", e)


# (static batch, static target count) -> (loss, aux): forward, loss and backward of the batch
# with gradients accumulated into .grad (``step.loss_and_backward`` bound to a forward)
StepFn = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class StepVariant:
    """A step function to record, by name; ``compiled`` ones log compilation and may fail to
    capture, after which the next variant is recorded instead."""

    name: str
    fn: StepFn
    compiled: bool = False


class GraphedStep:
    """Records ``variants[0]`` (falling back along the list when a capture fails) on static
    batches of ``batch_size`` rows, one graph per (width, target bucket), and replays it.

    ``arrs`` are the training arrays the row indices of :meth:`run` refer to; ``sampler`` draws
    the negatives outside the graph (the eager step's draws); ``params`` are the parameters
    whose ``.grad`` the step accumulates into; ``chunks`` > 1 runs each batch as that many
    length-sorted chunks (only for models whose chunks may each run their own backward)."""

    def __init__(
        self,
        variants: list[StepVariant],
        params: list[torch.nn.Parameter],
        arrs: TrainArrays,
        sampler: NegativeSampler,
        batch_size: int,
        chunks: int = 1,
    ):
        self.variants, self.params, self.arrs, self.sampler = list(variants), params, arrs, sampler
        self.device = sampler.device
        self.B, self.N, self.K = batch_size, arrs.ids.shape[1], sampler.k
        # chunks > 1: the batch's rows sorted by length and run as chunks of R rows, each at its
        # own width rounded up to a multiple of ``width_step`` (one graph per width and target
        # bucket); else one pass at the full width, as the eager step
        self.chunks = chunks if chunks > 1 and self.B % chunks == 0 else 1
        self.R = self.B // self.chunks
        self.width_step = self.N if self.chunks == 1 else -(-self.N // 8)  # <= 8 widths
        self.bucket = max(256, -(-self.R * self.N // 16))  # <= 16 target buckets per width
        dev = self.device
        self.ts_dtype = torch.from_numpy(arrs.ts[:1]).dtype
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}  # width -> static ids, ts, query_ts
        self.norm = torch.ones((), device=dev)  # the batch's number of targets (the loss divisor)
        # Two pinned host staging slots, so the next batch's copies are asynchronous and the
        # host prepares batch k+1 while the GPU replays step k (a pageable copy would wait for
        # the stream to drain first). A slot is reused only after its copies have completed;
        # each chunk has its own region of a slot.
        pin = dev.type == "cuda"
        self.region = 3 * (self.R * self.N + self.bucket)  # a chunk's target triples, rounded-up bucket included
        # per slot: the staged row inputs by name, "idx" (target triples), "norm", and "done"
        # (the event after its copies; None on the CPU)
        self.slots: list[dict[str, Any]] = [
            {
                **{name: torch.empty(self.B * self.N, dtype=dt, pin_memory=pin) for name, dt in self._row_fields()},
                "idx": torch.zeros(self.chunks * self.region, dtype=torch.long, pin_memory=pin),
                "norm": torch.ones((), pin_memory=pin),
                "done": torch.cuda.Event() if pin else None,
            }
            for _ in range(2)
        ]
        self.slot = 0
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Batch, tuple]] = {}
        self.pool: Any = None  # the memory pool the graphs share (``graph.pool()`` of the first)
        self.disabled = False

    def _row_fields(self) -> tuple[tuple[str, torch.dtype], ...]:
        """The per-row inputs staged each step (the step reads the targets at the positions,
        not ``targets``/``lengths``: a static batch leaves those empty)."""
        return (("ids", torch.long), ("ts", self.ts_dtype), ("query_ts", self.ts_dtype))

    @property
    def compiled(self) -> bool:
        return bool(self.variants) and self.variants[0].compiled

    # ---------------------------------------------------------------- recording
    def _capture(self, key: tuple[int, int], bufs: Batch):
        step = self.variants[0].fn
        saved = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            saved.append(p.grad.clone())
        # warm-up outside the graph (lazy initialisation, kernel compilation), then restore the
        # gradients it accumulated: a capture may come in the middle of gradient accumulation
        # The warm-up also checks that the step never waits on the GPU (an op that reads a
        # value back, e.g. the padded MoE path sizing its buffer): such a step cannot be
        # captured, and a capture that fails half-way leaves the CUDA RNG unusable for the
        # eager fallback, so it must be refused here, before the capture starts.
        if not self.graphs and self.compiled:
            log.info("compiling the model for the CUDA-graph step (once per run, typically 10-35 s; train.compile=false skips it)")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                # first pass unchecked: one-time work may synchronise (compilation and its
                # autotuning, lazy library initialisation); the second must not, so it must not
                # recompile either
                with slow_compile_warning(self.compiled):
                    step(bufs, self.norm)
                with _no_host_syncs():
                    step(bufs, self.norm)
        finally:  # also when refused: the eager step that follows must start from these gradients
            torch.cuda.current_stream(self.device).wait_stream(side)
            with torch.no_grad():
                for p, g in zip(self.params, saved):
                    assert p.grad is not None  # set above; a step accumulates into it
                    p.grad.copy_(g)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss, aux = step(bufs, self.norm)
        except Exception:
            _release_rng_from_failed_capture(self.device)
            raise
        # keep the static outputs (already detached), not the captured autograd graph
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, bufs, (loss, aux))
        log.info("CUDA graph recorded for width %d, %d target positions (%d graphs)", key[0], key[1], len(self.graphs))

    # ---------------------------------------------------------------- one step
    def _plan(self, rows: np.ndarray, lengths: np.ndarray, n: int, slot: dict) -> tuple[list, int]:
        """The host side of every chunk: its width, target bucket and staged inputs."""
        arrs, N = self.arrs, self.N
        parts = [np.arange(self.B)] if self.chunks == 1 else length_sorted_chunks(lengths, self.chunks)
        plan, count = [], 0
        for j, idx in enumerate(parts):
            w = N if self.chunks == 1 else min(N, -(-int(lengths[idx].max()) // self.width_step) * self.width_step)
            sub = rows[idx]
            tg = arrs.targets[sub, :w]
            r, c = np.nonzero(tg)
            P = len(r)
            Pb = -(-P // self.bucket) * self.bucket
            host_t = slot["idx"][j * self.region : j * self.region + 3 * Pb].view(3, Pb)  # contiguous: one async copy
            host = host_t.numpy()
            host[0, :P] = r * w + c  # position in the chunk's (R, w) output
            host[1, :P] = tg[r, c]  # 0 on the bucket's padding: masked
            host[2, :P] = idx[r] * n + c  # row of the drawn negatives
            host[:, P:] = 0
            staged = {}
            for name, _ in self._row_fields():
                region = slot[name][j * self.R * N : j * self.R * N + self.R * w].view(self.R, w)
                region.numpy()[...] = getattr(arrs, name)[sub, :w]
                staged[name] = region
            plan.append(((w, Pb), staged, host_t))
            count += P
        return plan, count

    def run(self, rows: np.ndarray):
        """Forward + backward of the global batch ``rows`` (gradients accumulate into ``.grad``);
        returns (loss, aux) or None when this batch must take the eager step."""
        if self.disabled or len(rows) != self.B:
            return None
        lengths = self.arrs.lengths[rows]
        n = int(lengths.max())
        # the same negative draws as the eager step: (B, n, K) from the sampler's generator
        # (rewound if this step falls back to eager, which then draws them again)
        rng = self.sampler.generator.get_state()
        negs = self.sampler.draw(len(rows), n).view(len(rows) * n, self.K)
        slot = self.slots[self.slot]
        self.slot ^= 1
        if slot["done"] is not None:
            slot["done"].synchronize()  # its copies of two steps ago (long finished in practice)
        plan, count = self._plan(rows, lengths, n, slot)
        slot["norm"].fill_(float(count))  # the whole batch's targets: every chunk's loss divisor
        self.norm.copy_(slot["norm"], non_blocking=True)
        # record the graphs this step needs before replaying any, so a refused capture leaves
        # no chunk's gradients behind for the eager step to add to
        for key, staged, host_t in plan:
            if key not in self.graphs:
                bufs = self._stage(key, staged, host_t, negs)
                try:
                    self._capture(key, bufs)
                except Exception as e:  # noqa: BLE001 - any capture failure falls back
                    self.sampler.generator.set_state(rng)
                    failed = self.variants.pop(0)
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    if self.variants:  # e.g. the compiled model failed: record the plain one
                        # (graphs recorded so far keep their kernels: the same computation)
                        log.warning("the %s step failed in the CUDA-graph step (%s); recording the %s step", failed.name, why, self.variants[0].name)
                        return self.run(rows)
                    self.disabled = True
                    self.graphs.clear()
                    log.warning("CUDA graphs off for this run (%s); training eagerly", why)
                    return None
        whole = None  # one pass: its (loss, aux)
        total: torch.Tensor | None = None  # chunks: the sum of their losses
        for key, staged, host_t in plan:
            self._stage(key, staged, host_t, negs)
            loss, aux = self._replay(key)
            if self.chunks == 1:
                whole = (loss, aux)
            else:  # read each chunk's loss before the next replay reuses the pool (stream order)
                total = loss.clone() if total is None else total.add_(loss)
        if slot["done"] is not None:
            slot["done"].record()
        return whole if self.chunks == 1 else (total, None)

    def _stage(self, key: tuple[int, int], staged: dict[str, torch.Tensor], host_t: torch.Tensor, negs: torch.Tensor) -> Batch:
        """Copy one chunk's staged inputs and targets into the static batch of graph ``key``."""
        w, Pb = key
        dev = self.device
        if w not in self.inputs:
            self.inputs[w] = {name: torch.zeros(self.R, w, dtype=dt, device=dev) for name, dt in self._row_fields()}
            self.inputs[w].update(targets=torch.zeros(0, dtype=torch.long, device=dev), lengths=torch.zeros(0, dtype=torch.long, device=dev))
        if key in self.graphs:
            bufs = self.graphs[key][1]
        else:
            new = lambda *shape: torch.empty(*shape, dtype=torch.long, device=dev)  # noqa: E731
            inp = self.inputs[w]
            bufs = Batch(
                ids=inp["ids"],
                ts=inp["ts"],
                query_ts=inp["query_ts"],
                lengths=inp["lengths"],
                targets=inp["targets"],
                positions=new(Pb),
                pos_targets=new(Pb),
                negatives=new(Pb, self.K),
            )
        for name, region in staged.items():
            getattr(bufs, name).copy_(region, non_blocking=True)
        idx = host_t.to(dev, non_blocking=True)
        positions, pos_targets, negatives = bufs.positions, bufs.pos_targets, bufs.negatives
        assert positions is not None and pos_targets is not None and negatives is not None  # a static training batch
        positions.copy_(idx[0])
        pos_targets.copy_(idx[1])
        negatives.copy_(negs.index_select(0, idx[2]))
        return bufs

    def _replay(self, key: tuple[int, int]):
        graph, _, out = self.graphs[key]
        graph.replay()
        return out
