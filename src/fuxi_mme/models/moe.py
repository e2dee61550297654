"""Sparsely-gated Mixture-of-Experts layer with two interchangeable expert back ends.

Legend: T tokens, D input width, F expert hidden width, O output width, E experts, K top-k,
A = T*K token-expert assignments.

Routing: softmax over router logits; the top-k experts are chosen (on logits plus the
aux-free balancing bias, if used); gates are the chosen probabilities renormalised over the
k choices when k > 1 (Switch-style raw probability when k = 1, so the router still learns
from the task loss). Balancing: Switch auxiliary loss E * sum_e f_e * P_e (f_e = share of
assignments, P_e = mean router probability), or DeepSeek-style aux-free bias updates (a
selection-only bias moved in proportion to each expert's relative load error; the sign-only
update cycles on small batches).

Back ends (same parameters, same result):
* ``loop``: reference, one masked matmul per expert.
* ``batched``: assignments grouped by expert without Python loops over tokens (``moe_dispatch.py``:
  by counting, no sort, for up to ``COUNTING_MAX_EXPERTS`` experts; permutations whose backward
  is a gather, not a scatter-add), then one grouped GEMM (``torch._grouped_mm``, CUDA + bf16 +
  aligned widths) or, elsewhere, one padded ``bmm``.
* ``dense``: every token through every expert as one wide GEMM (experts' weights side by
  side), each expert's output weighted by its gate (zero for the experts not chosen). E/K times
  the sparse FLOPs, but no sort, no gather, no data-dependent shape and no host sync, and the
  GEMMs are large and well shaped. At the small widths of these models (e.g. 4 experts of
  width 25 on ML-1M) the sparse paths are bound by bookkeeping kernels and by weight-gradient
  GEMMs with a tiny output and a huge reduction, so ``auto`` picks ``dense`` there when
  E/K <= 4; where the grouped GEMM applies (CUDA, bf16, widths multiple of 8, e.g. ML-20M's
  128/512) it picks ``batched``, which measured faster than ``dense`` at that width
  (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .moe_dispatch import ARGMAX_TOP_K, DispatchRows, PermuteRows, dispatch_plan, top_k_indices


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype


def _grouped_mm_ok(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda" or _autocast_dtype(x) != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in ws)


class MoE(nn.Module):
    """Drop-in replacement for a SwiGLU FFN (``kind='swiglu'``) or a linear projection
    (``kind='linear'``, optional bias)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        num_experts: int,
        top_k: int,
        kind: str = "swiglu",
        hidden: int | None = None,
        bias: bool = False,
        shared_expert: bool = False,
        router_noise: float = 0.0,
        balance: str = "aux_loss",
        aux_loss_weight: float = 0.01,
        bias_update_rate: float = 1e-3,
        num_streams: int = 1,
        stream_embedding: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
        self.kind, self.E, self.K = kind, num_experts, top_k
        self.balance, self.aux_loss_weight, self.bias_update_rate = balance, aux_loss_weight, bias_update_rate
        self.router_noise = router_noise
        self.backend = backend
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.stream_emb = nn.Embedding(num_streams, dim) if stream_embedding else None
        if self.stream_emb is not None:
            nn.init.normal_(self.stream_emb.weight, std=0.02)
        E = num_experts
        if kind == "swiglu":
            F_ = hidden or dim
            self.w1 = nn.Parameter(torch.empty(E, dim, F_))
            self.w3 = nn.Parameter(torch.empty(E, dim, F_))
            self.w2 = nn.Parameter(torch.empty(E, F_, out_dim))
            for w, fan_in in ((self.w1, dim), (self.w3, dim), (self.w2, F_)):
                nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            self.b = None
        elif kind == "linear":
            self.w = nn.Parameter(torch.empty(E, dim, out_dim))
            nn.init.uniform_(self.w, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            self.b = nn.Parameter(torch.zeros(E, out_dim)) if bias else None
        else:
            raise ValueError(f"unknown expert kind {kind!r}")
        self.shared: nn.Module | None = None
        if shared_expert:
            if kind == "swiglu":
                from .common import SwiGLU

                self.shared = SwiGLU(dim, hidden or dim, out_dim)
            else:
                self.shared = nn.Linear(dim, out_dim, bias=bias)
        self.expert_bias: torch.Tensor
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.last_aux: torch.Tensor | None = None
        self.last_path = ""  # which expert path the last forward took: loop, grouped or padded
        self.last_stats: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] | None = None  # routing sums while accumulating over forwards

    # ----------------------------------------------------------------- experts
    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if self.kind == "swiglu":
            return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]
        y = x @ self.w[e]
        return y + self.b[e] if self.b is not None else y

    def _loop(self, x_TD, top_TK, gate_TK):
        self.last_path = "loop"
        y = x_TD.new_zeros(x_TD.shape[0], self._out_dim())
        for e in range(self.E):
            # no early exit for an expert without tokens: its ops run on zero rows, so the path
            # has no data-dependent branch and exports as it runs
            tok, slot = torch.nonzero(top_TK == e, as_tuple=True)
            y.index_add_(0, tok, (self._expert(x_TD[tok], e) * gate_TK[tok, slot, None]).to(y.dtype))
        return y

    def _expert_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.w1, self.w3, self.w2) if self.kind == "swiglu" else (self.w,)

    def _out_dim(self) -> int:
        return (self.w2 if self.kind == "swiglu" else self.w).shape[-1]

    def _batched(self, x_TD, top_TK, gate_TK, valid_T=None):
        T, K = top_TK.shape
        E = self.E
        expert_A = top_TK.reshape(-1)
        if valid_T is not None:  # padding's assignments go to a virtual expert E, after the real ones, never computed
            expert_A = torch.where(valid_T.repeat_interleave(K), expert_A, E)
        dest_A, slot_to_A, ends = dispatch_plan(expert_A, E + 1)
        ends_E = ends[:E]
        # Under autocast the residual stream (and so x) stays fp32; the experts' matmuls run in
        # the autocast dtype, which is what makes the grouped GEMM applicable. Cast before the
        # gather, so the permutation moves half the bytes.
        x_in = x_TD
        if x_TD.is_cuda and torch.is_autocast_enabled("cuda"):
            x_in = x_TD.to(torch.get_autocast_dtype("cuda"))
        x_AD = DispatchRows.apply(x_in, dest_A, slot_to_A, K)  # rows in expert order
        expert_S = expert_A[slot_to_A]  # each slot's expert (ascending; E = padding)
        live_S = None
        if valid_T is not None:
            # slots past the real experts' groups: excluded from the products and zeroed
            # wherever their rows could carry something (what the grouped GEMM leaves in its
            # output past the last group is unspecified), so neither they nor their gradients
            # reach anything
            live_S = (torch.arange(expert_S.numel(), device=x_TD.device) < ends_E[-1])[:, None]
            x_AD = torch.where(live_S, x_AD, 0)
        ws = self._expert_weights()
        if _grouped_mm_ok(x_AD, *ws):
            self.last_path = "grouped"
            offs = ends_E.to(torch.int32)
            mm = lambda a, w: torch._grouped_mm(a, w.to(a.dtype), offs=offs)  # noqa: E731
            out_S = self._run_experts(x_AD, mm, expert_S.clamp(max=E - 1), live_S)
        else:
            # Padded batch: (E, C, D) with C = the busiest expert's count (one host sync to size
            # the buffer; the grouped GEMM above needs none). Padding's slots all land on one
            # row of a spare (E+1)-th block, which is never computed.
            self.last_path = "padded"
            counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
            starts = torch.cat([ends_E - counts_E, ends_E[-1:]])
            within_S = torch.arange(expert_S.numel(), device=x_TD.device) - starts[expert_S]
            if live_S is not None:
                within_S = torch.where(live_S[:, 0], within_S, 0)
            C = int(counts_E.max()) if expert_S.numel() else 0
            buf = x_AD.new_zeros(E + 1, max(C, 1), x_AD.shape[-1])
            buf[expert_S, within_S] = x_AD
            mm = lambda a, w: torch.bmm(a, w.to(a.dtype))  # noqa: E731
            out = self._run_experts(buf[:E], mm, None)
            out_S = out[expert_S.clamp(max=E - 1), within_S]
            if live_S is not None:
                out_S = torch.where(live_S, out_S, 0)
        # back to (token, choice) order by a gather, then the gate-weighted sum over the k
        # choices, accumulated in the input's dtype (fp32 under autocast)
        out_TKO = PermuteRows.apply(out_S, dest_A, slot_to_A).view(T, K, -1)
        return (out_TKO.to(x_TD.dtype) * gate_TK[:, :, None].to(x_TD.dtype)).sum(1)

    def _dense(self, x_TD, top_TK, gate_TK):
        self.last_path = "dense"
        T, E = x_TD.shape[0], self.E
        gates_TE = torch.zeros(T, E, dtype=gate_TK.dtype, device=x_TD.device).scatter(1, top_TK, gate_TK)
        if self.kind == "swiglu":
            D, F_ = self.w1.shape[1], self.w1.shape[2]
            w13 = torch.cat([self.w1, self.w3], dim=2).permute(1, 0, 2).reshape(D, E * 2 * F_)  # (D, E*(F|F))
            h = (x_TD @ w13).view(T, E, 2, F_)
            a = F.silu(h[:, :, 0]) * h[:, :, 1] * gates_TE[:, :, None].to(h.dtype)  # (T, E, F)
            y = a.reshape(T, E * F_) @ self.w2.reshape(E * F_, -1)
        else:
            D, O = self.w.shape[1], self.w.shape[2]
            h = (x_TD @ self.w.permute(1, 0, 2).reshape(D, E * O)).view(T, E, O)
            y = (h * gates_TE[:, :, None].to(h.dtype)).sum(1)
            if self.b is not None:
                y = y + gates_TE.to(y.dtype) @ self.b.to(y.dtype)
        return y.to(x_TD.dtype)

    def _run_experts(self, a, mm, expert_A, live=None):
        """The experts on rows ``a`` grouped by ``mm``; ``live`` (rows, 1) bool: rows outside it
        are set to zero after each product (see ``_batched``)."""
        keep = (lambda t: t) if live is None else (lambda t: torch.where(live, t, 0))  # noqa: E731
        if self.kind == "swiglu":
            # W1 and W3 stay two products: side by side as one, the grouped GEMMs were 0.19 ms a
            # step faster at ML-20M on an H200, but the gradient of the packed product's halves
            # compiled to one pointwise kernel 0.28 ms slower (docs/performance.md)
            return keep(mm(keep(F.silu(mm(a, self.w1)) * mm(a, self.w3)), self.w2))
        y = mm(a, self.w)
        if self.b is not None:
            y = y + (self.b[expert_A] if expert_A is not None else self.b[:, None, :]).to(y.dtype)
        return keep(y)

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, stream: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., D) -> (..., O). ``valid`` (...) bool marks the real tokens: padding is left out
        of the statistics, the aux loss and the experts (their output there is zero, in every
        back end; the batched one does not compute it at all: at ML-20M about half of all
        positions are padding). The models here pad after each sequence and attend causally,
        so nothing at a padding position reaches a real one. ``stream`` (...) long selects the
        per-stream router embedding."""
        shape = x.shape[:-1]
        x_TD = x.reshape(-1, x.shape[-1])
        r_in = x_TD
        if self.stream_emb is not None and stream is not None:
            r_in = x_TD + self.stream_emb(stream.reshape(-1)).to(x_TD.dtype)
        logits = self.router(r_in).float()
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        probs = logits.softmax(-1)
        sel = logits + self.expert_bias if self.balance == "aux_free" else logits
        E_max, K_max = ARGMAX_TOP_K
        top_TK = top_k_indices(sel, self.K) if self.E <= E_max and self.K <= K_max else sel.topk(self.K, dim=-1).indices
        gate_TK = probs.gather(-1, top_TK)
        if self.K > 1:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
        backend = self.backend
        if backend == "auto":
            # the grouped GEMM where it applies (wide, aligned experts: ML-20M); elsewhere dense
            # while it costs at most 4x the sparse FLOPs (narrow experts: ML-1M, the demo)
            grouped = _grouped_mm_ok(x_TD, *self._expert_weights())
            backend = "batched" if grouped or self.E > 4 * self.K else "dense"
        if backend in ("loop", "dense"):
            y = self._loop(x_TD, top_TK, gate_TK) if backend == "loop" else self._dense(x_TD, top_TK, gate_TK)
            if valid is not None:
                y = torch.where(valid.reshape(-1, 1), y, 0)
        else:
            y = self._batched(x_TD, top_TK, gate_TK, valid.reshape(-1) if valid is not None else None)
        if self.shared is not None:
            y = y + self.shared(x_TD)
        self._statistics(probs, top_TK, valid)
        return y.reshape(*shape, -1)

    def _statistics(self, probs_TE, top_TK, valid):
        w_T = valid.reshape(-1).to(probs_TE.dtype) if valid is not None else probs_TE.new_ones(probs_TE.shape[0])
        # assignments per expert as a one-hot sum (a reduction): ``index_add_`` into E addresses
        # made every assignment an atomic add colliding on the same few words (the kernel
        # around it, 0.20 ms a step at ML-20M on an H200 under the profiler)
        hits_TE = (top_TK[:, :, None] == torch.arange(self.E, device=top_TK.device)).to(probs_TE.dtype).sum(1)
        counts_E = (hits_TE * w_T[:, None]).sum(0)
        ent = -(probs_TE * probs_TE.clamp(min=1e-9).log()).sum(-1)
        # sums over tokens, so that several forwards (a batch in chunks) add up to one batch
        part = {"counts": counts_E, "prob_sum": (probs_TE * w_T[:, None]).sum(0), "n": w_T.sum(), "entropy_sum": (ent * w_T).sum()}
        if self._sums is not None:  # accumulating (one_batch_of_routing): finished after the last forward
            self._sums = {k: self._sums[k] + v for k, v in part.items()} if self._sums else part
            return
        self._finish(part)

    def _finish(self, sums: dict[str, torch.Tensor]) -> None:
        """The aux loss, router statistics and aux-free bias update of one batch's routing sums."""
        n = sums["n"].clamp(min=1)
        load_E = sums["counts"] / (n * self.K)  # share of assignments
        mean_prob_E = sums["prob_sum"] / n
        aux = self.E * (load_E * mean_prob_E).sum()
        self.last_aux = aux * self.aux_loss_weight if self.balance == "aux_loss" else None
        self.last_stats = {"load": load_E.detach(), "aux": aux.detach(), "entropy": (sums["entropy_sum"] / n).detach()}
        if self.balance == "aux_free" and self.training:
            with torch.no_grad():  # raise under-loaded experts' bias, lower the others', in proportion
                self.expert_bias += self.bias_update_rate * (load_E.mean() - load_E) / load_E.mean()


def release_aux_graphs(model: nn.Module) -> None:
    """Detach every MoE layer's last aux loss once the backward pass has used it. Held with its
    autograd graph, it keeps that step's gradient-accumulation nodes alive, with the CUDA stream
    they were made on, into the next step; a CUDA-graph capture on another stream then warns
    that the streams do not match and has to synchronise with them."""
    for m in model.modules():
        if isinstance(m, MoE) and m.last_aux is not None and m.last_aux.grad_fn is not None:
            m.last_aux = m.last_aux.detach()


@contextlib.contextmanager
def one_batch_of_routing(model: nn.Module):
    """Forwards inside the block count as one batch for every MoE layer of ``model``: the aux
    loss, router statistics and aux-free bias update come from the routing sums over all of
    them (a batch run in length chunks), exactly as from one forward of the whole batch. They
    are set when the block ends, so the aux loss is read after it."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for m in layers:
        m._sums = {}
    try:
        yield
        for m in layers:
            if m._sums:
                m._finish(m._sums)
    finally:
        for m in layers:
            m._sums = None


# The Inductor setting that avoids a known compile hang in MoE models, and the environment
# variable that sets it (a user's explicit value wins)
PERSISTENT_REDUCTIONS = "triton.persistent_reductions"
PERSISTENT_REDUCTIONS_ENV = "TORCHINDUCTOR_PERSISTENT_REDUCTIONS"


def moe_compile_options() -> dict[str, Any] | None:
    """``torch.compile`` options for a model with MoE layers: persistent reductions off.

    On an H200 (torch 2.11, triton 3.6) NVIDIA's ``ptxas`` never returned on the persistent
    reduction that Inductor made of four MoE layers' router statistics (Fuxi-MME, 4 layers, 4
    streams; benchmarks/results/compile-hang-NVIDIA_H200.md); with persistent reductions off
    the same run compiled and trained. None (Inductor's defaults) when
    ``TORCHINDUCTOR_PERSISTENT_REDUCTIONS`` is set (the user's choice stands) or when this
    torch has no such setting."""
    import os

    if os.environ.get(PERSISTENT_REDUCTIONS_ENV) is not None:
        return None
    try:
        import torch._inductor.config as inductor_config

        # _config is set on the module at runtime (torch's ConfigModule); the stub is the plain module
        if PERSISTENT_REDUCTIONS not in inductor_config._config:  # type: ignore[attr-defined]
            return None
    except Exception:  # noqa: BLE001 - no Inductor in this build: torch.compile will say so itself
        return None
    return {PERSISTENT_REDUCTIONS: False}
