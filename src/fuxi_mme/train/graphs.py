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

Gradients accumulate into ``.grad`` tensors that exist before the first capture and are only
ever zeroed in place afterwards (never set to None). The optimizer step, gradient clipping and
the scheduler stay eager (a handful of fused kernels). Dropout inside the graph draws from
PyTorch's graph-safe generator, so the dropout masks differ from an eager run's; with dropout 0
the losses equal the eager step's to rounding (``tests/test_gpu.py``).

Not used (eager step instead): CPU, multi-process training, ``torch.compile``, the final
partial batch of an epoch, and any model whose step cannot be captured (e.g. an op that
synchronises with the host); the reason is logged once.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from .loss import sample_negatives, sampled_softmax_loss

if TYPE_CHECKING:
    from .loop import Trainer

log = logging.getLogger(__name__)


def graphs_wanted(trainer: "Trainer") -> bool:
    t = trainer.cfg.train
    if t.cuda_graphs == "off":
        return False
    ok = trainer.device.type == "cuda" and not trainer.dist.enabled and not t.compile
    if t.cuda_graphs == "on" and not ok:
        log.warning("train.cuda_graphs=on needs single-process CUDA training without train.compile; training eagerly")
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


class GraphedStep:
    def __init__(self, trainer: "Trainer"):
        self.tr = trainer
        t = trainer.cfg.train
        self.B, self.N, self.K = t.batch_size, trainer.train_arrs.ids.shape[1], t.num_negatives
        self.bucket = max(256, -(-self.B * self.N // 16))  # <= 16 graphs per run
        dev = trainer.device
        arrs = trainer.train_arrs
        self.ids = torch.zeros(self.B, self.N, dtype=torch.long, device=dev)
        self.ts = torch.zeros(self.B, self.N, dtype=torch.from_numpy(arrs.ts[:1]).dtype, device=dev)
        self.query_ts = torch.zeros_like(self.ts)
        # Two pinned host staging slots, so the next batch's copies are asynchronous and the
        # host prepares batch k+1 while the GPU replays step k (a pageable copy would wait for
        # the stream to drain first). A slot is reused only after its copies have completed.
        pin = dev.type == "cuda"
        self.slots = [
            {
                **{name: torch.empty(self.B, self.N, dtype=buf.dtype, pin_memory=pin) for name, buf in (("ids", self.ids), ("ts", self.ts), ("query_ts", self.query_ts))},
                "idx": torch.zeros(3 * (self.B * self.N + self.bucket), dtype=torch.long, pin_memory=pin),  # room for a rounded-up bucket
                "done": torch.cuda.Event() if pin else None,
            }
            for _ in range(2)
        ]
        self.slot = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], tuple]] = {}
        self.pool = None
        self.disabled = False
        self.scale = 1.0 / t.grad_accum

    # ---------------------------------------------------------------- the recorded work
    def _body(self, bufs: dict[str, torch.Tensor]):
        tr = self.tr
        with torch.autocast(tr.device.type, dtype=tr.amp_dtype, enabled=tr.amp_dtype is not None, cache_enabled=False):
            user, items = tr.step_module(self.ids, self.ts, self.query_ts)
            user_P = user.reshape(-1, user.shape[-1]).index_select(0, bufs["pos"])
            loss = sampled_softmax_loss(user_P[None], bufs["tgt"][None], items, bufs["neg"][None], tr.cfg.train.temperature)
        aux = tr.model.aux_loss()
        ((loss + aux if aux is not None else loss) * self.scale).backward()
        return loss, aux

    def _capture(self, Pb: int, bufs: dict[str, torch.Tensor]):
        params = [p for p in self.tr.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        saved = [p.grad.clone() for p in params]
        # warm-up outside the graph (lazy initialisation, kernel compilation), then restore the
        # gradients it accumulated: a capture may come in the middle of gradient accumulation
        # The warm-up also checks that the step never waits on the GPU (an op that reads a
        # value back, e.g. the padded MoE path sizing its buffer): such a step cannot be
        # captured, and a capture that fails half-way leaves the CUDA RNG unusable for the
        # eager fallback, so it must be refused here, before the capture starts.
        side = torch.cuda.Stream(self.tr.device)
        side.wait_stream(torch.cuda.current_stream(self.tr.device))
        with torch.cuda.stream(side), _no_host_syncs():
            self._body(bufs)
        torch.cuda.current_stream(self.tr.device).wait_stream(side)
        with torch.no_grad():
            for p, g in zip(params, saved):
                p.grad.copy_(g)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss, aux = self._body(bufs)
        # keep the static outputs, not the captured autograd graph (it is never used again, and
        # holding it keeps its AccumulateGrad nodes alive, which is what PyTorch's "stream does
        # not match" warning at a later capture is about; not yet verified on a GPU)
        out = (loss.detach(), aux.detach() if aux is not None else None)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[Pb] = (graph, bufs, out)
        log.info("CUDA graph recorded for %d target positions (%d graphs)", Pb, len(self.graphs))

    # ---------------------------------------------------------------- one step
    def run(self, rows: np.ndarray):
        """Forward + backward of the global batch ``rows`` (gradients accumulate into ``.grad``);
        returns (loss, aux) or None when this batch must take the eager step."""
        if self.disabled or len(rows) != self.B:
            return None
        tr, N, K = self.tr, self.N, self.K
        arrs = tr.train_arrs
        n = int(arrs.lengths[rows].max())
        # the same negative draws as the eager step: (B, n, K) from the trainer's generator
        # (rewound if this step falls back to eager, which then draws them again)
        rng = tr.neg_gen.get_state()
        negs = sample_negatives((len(rows), n, K), tr.ds.num_items, tr.device, tr.neg_gen)
        tg = arrs.targets[rows, :n]
        r, c = np.nonzero(tg)
        P = len(r)
        Pb = -(-P // self.bucket) * self.bucket
        slot = self.slots[self.slot]
        self.slot ^= 1
        if slot["done"] is not None:
            slot["done"].synchronize()  # its copies of two steps ago (long finished in practice)
        host_t = slot["idx"][: 3 * Pb].view(3, Pb)  # contiguous, so the copy below is one async DMA
        host = host_t.numpy()
        host[0, :P] = r * N + c  # position in the (B, max_len) output
        host[1, :P] = tg[r, c]  # 0 on the bucket's padding: masked
        host[2, :P] = r * n + c  # row of the drawn negatives
        host[:, P:] = 0
        for name, src in (("ids", arrs.ids), ("ts", arrs.ts), ("query_ts", arrs.query_ts)):
            slot[name].numpy()[...] = src[rows, :N]
            getattr(self, name).copy_(slot[name], non_blocking=True)
        idx = host_t.to(tr.device, non_blocking=True)
        if slot["done"] is not None:
            slot["done"].record()
        if Pb in self.graphs:
            bufs = self.graphs[Pb][1]
        else:
            new = lambda *shape: torch.empty(*shape, dtype=torch.long, device=tr.device)  # noqa: E731
            bufs = {"pos": new(Pb), "tgt": new(Pb), "neg": new(Pb, K)}
        bufs["pos"].copy_(idx[0])
        bufs["tgt"].copy_(idx[1])
        bufs["neg"].copy_(negs.view(-1, K).index_select(0, idx[2]))
        if Pb not in self.graphs:
            try:
                self._capture(Pb, bufs)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
                tr.neg_gen.set_state(rng)
                self.disabled = True
                self.graphs.clear()
                log.warning("CUDA graphs off for this run (%s: %s); training eagerly", type(e).__name__, str(e).splitlines()[0][:200])
                return None
        return self._replay(Pb)

    def _replay(self, Pb: int):
        graph, _, out = self.graphs[Pb]
        graph.replay()
        return out
