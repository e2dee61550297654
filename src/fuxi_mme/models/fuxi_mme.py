"""Fuxi-MME (arXiv 2510.25285): multi-embedding + Mixture-of-Experts on FuXi blocks.

Legend: B batch, M streams, N positions, D = d / M stream width, I items.

The item table (I x d) is split into M tables of width d / M (total size unchanged). Each item
gives M sub-embeddings, hence M input sequences, processed by a shared stack of FuXi blocks
(streams folded into the batch dimension) or by one stack per stream. Inside the blocks an
MoE layer may replace the stage-2 SwiGLU (default), the u projection or the stage-1 output
projection. Streams are combined for scoring by:

* ``concat``: the M outputs are concatenated to d and scored by cosine against the
  concatenated sub-embeddings (a dot product that sums per-facet dot products);
* ``mean``: the mean over streams of per-stream cosine scores (each stream normalised, the
  user side scaled by 1/M, so a plain dot product still gives the score).

With M = 1 and MoE off the parameters map one-to-one onto :class:`FuxiAlpha` and the outputs
are identical (tested). ``model.mixer`` swaps or interleaves state-space blocks as in FuXi-alpha
(docs/models.md#state-space-encoder).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from ..config import ModelConfig
from .common import Dropout, SequenceModel, TemporalBuckets, behavior_table, l2_normalize, sequence_lengths
from .denoise import TokenGate, denoise_penalty, make_denoise, release_denoise
from .fuxi_alpha import FuxiBlock, decoder, run_decoder
from .moe import moe_compile_options, one_batch_of_routing, release_aux_graphs
from .ssm import SSMBlock


def _embeddings(modules: nn.ModuleList) -> list[nn.Embedding]:
    """The embeddings held by a ModuleList, typed as such (its items are typed plain Modules)."""
    return [cast(nn.Embedding, e) for e in modules]


class FuxiMME(SequenceModel):
    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        M = cfg.num_embeddings
        self.M, self.D, self.max_len = M, cfg.dim // M, max_len
        self.combine, self.shared_decoder = cfg.combine, cfg.shared_decoder
        self.item_embs = nn.ModuleList(nn.Embedding(num_items + 1, self.D, padding_idx=0) for _ in range(M))
        self.pos_embs = nn.ModuleList(nn.Embedding(max_len, self.D) for _ in range(1 if cfg.shared_positions else M))
        for emb in [*self.item_embs, *self.pos_embs]:
            nn.init.trunc_normal_(emb.weight, std=0.02)
        with torch.no_grad():
            for emb in _embeddings(self.item_embs):
                emb.weight[0].zero_()
        self.drop = Dropout(cfg.dropout)
        # one d-wide behaviour table whose M slices of width d / M feed the M streams
        # (docs/models.md#behaviour-input); created after the item tables, absent when off
        self.behavior_emb = behavior_table(cfg.use_behavior, cfg.dim)
        self.temporal = TemporalBuckets(cfg)
        moe = cfg.moe if cfg.moe.num_experts > 0 else None
        self.moe_cfg, self.dropout_p = moe, cfg.dropout

        self.mixer = cfg.mixer
        denoise = make_denoise(cfg.denoise, cfg.dim, max_len, cfg.denoise_weight)
        if denoise is not None:  # on the M streams side by side; none adds no key (docs/models.md#noise-decoupling)
            self.denoise = denoise
        # model.mixer (docs/models.md#state-space-encoder): the state-space blocks of `hybrid` sit
        # in their own lists, so under `attention` the keys are those of the published model
        if self.shared_decoder:
            self.blocks, ssm = decoder(cfg, self.D, max_len, moe, M)
            if ssm is not None:
                self.ssm_blocks = ssm
        else:
            stacks = [decoder(cfg, self.D, max_len, moe, M) for _ in range(M)]
            self.stream_blocks = nn.ModuleList(b for b, _ in stacks)
            if cfg.mixer == "hybrid":
                self.stream_ssm_blocks = nn.ModuleList(cast(nn.ModuleList, s) for _, s in stacks)

    # ---------------------------------------------------------------- helpers
    def _moe_layers(self):
        stacks = [self.blocks] if self.shared_decoder else [cast(nn.ModuleList, s) for s in self.stream_blocks]
        return [m for s in stacks for blk in s for m in cast(FuxiBlock | SSMBlock, blk).moe_layers()]

    def _input(self, ids: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) -> (B, M, N, D)."""
        B, N = ids.shape
        beh = None
        if self.behavior_emb is not None and behaviors is not None:
            beh = self.behavior_emb(behaviors).view(B, N, self.M, self.D) * math.sqrt(self.D)
        xs = []
        for m, emb in enumerate(self.item_embs):
            pos = cast(nn.Embedding, self.pos_embs[m if len(self.pos_embs) > 1 else 0]).weight[:N]
            x_m = emb(ids) * math.sqrt(self.D) + pos
            xs.append(x_m + beh[:, :, m] if beh is not None else x_m)
        x = self.drop(torch.stack(xs, dim=1))
        return x * (ids != 0)[:, None, :, None].to(x.dtype)

    def _combine(self, x: torch.Tensor, user: bool) -> torch.Tensor:
        """(..., M, D) -> (..., M*D) scoring vectors."""
        if self.combine == "concat":
            return l2_normalize(x.flatten(-2))
        x = l2_normalize(x)
        if user:
            x = x / self.M
        return x.flatten(-2)

    # ---------------------------------------------------------------- interface
    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        B, N = ids.shape
        M = self.M
        x = self._input(ids, behaviors)  # (B, M, N, D)
        valid = ids != 0
        if hasattr(self, "denoise"):
            x = self.denoise(x.transpose(1, 2).reshape(B, N, M * self.D), valid).view(B, N, M, self.D).transpose(1, 2)
        lengths = sequence_lengths(ids)
        # (B, N, N), shared by every stream and block
        buckets = self.temporal(ts, query_ts) if self.mixer != "ssm" else None
        if self.shared_decoder:
            x = x.reshape(B * M, N, self.D)  # row b * M + m: stream m of sequence b
            valid_f = valid.repeat_interleave(M, 0)
            stream = torch.arange(M, device=ids.device).repeat(B)[:, None].expand(B * M, N)
            # the M streams share one bucket map
            x = run_decoder(self.blocks, getattr(self, "ssm_blocks", None), x, buckets, valid_f, stream, groups=M, lengths=lengths)
            x = x.view(B, M, N, self.D)
        else:
            outs = []
            ssm_stacks = getattr(self, "stream_ssm_blocks", None)
            for m, blocks in enumerate(self.stream_blocks):
                stream = torch.full_like(ids, m)
                ssm = cast(nn.ModuleList, ssm_stacks[m]) if ssm_stacks is not None else None
                outs.append(run_decoder(cast(nn.ModuleList, blocks), ssm, x[:, m], buckets, valid, stream, lengths=lengths))
            x = torch.stack(outs, dim=1)
        return self._combine(x.transpose(1, 2), user=True)  # (B, N, M*D)

    def item_vectors(self) -> torch.Tensor:
        w = torch.stack([e.weight for e in _embeddings(self.item_embs)], dim=1)  # (I+1, M, D)
        return self._combine(w, user=False)

    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.last_aux for m in self._moe_layers() if m.last_aux is not None]
        gate = denoise_penalty(getattr(self, "denoise", None))
        if gate is not None:
            losses.append(gate)
        return torch.stack(losses).sum() if losses else None

    # ---------------------------------------------------------------- training needs (SequenceModel)
    def release_aux_graphs(self) -> None:
        release_aux_graphs(self)
        release_denoise(getattr(self, "denoise", None))

    def one_batch_of_routing(self):
        return one_batch_of_routing(self)

    def compile_options(self) -> dict[str, Any] | None:
        return moe_compile_options() if self.moe_cfg is not None else None

    def has_unused_parameters(self) -> bool:
        # the loop back end skips an expert that gets no tokens; the batched ones never do
        return self.moe_cfg is not None and self.moe_cfg.backend == "loop"

    def independent_length_chunks(self) -> bool:
        # the balance loss needs the routing of the whole batch; the gate's penalty is a batch mean
        return self.moe_cfg is None and not isinstance(getattr(self, "denoise", None), TokenGate)

    def graph_compile_problem(self) -> str | None:
        # Measured on the H200 (torch 2.11): the experts on u with dropout, compiled and recorded
        # in CUDA graphs, train far worse (demo, seeds 1 and 2: loss about 4.1 after 5 epochs
        # against 2.2 eager or compiled without graphs; dropout off trains normally). The cause
        # is not found (docs/training.md).
        if self.moe_cfg is not None and self.moe_cfg.placement == "u" and self.dropout_p > 0:
            return "model.moe.placement=u with dropout trains badly compiled inside CUDA graphs"
        return None

    def router_stats(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self._moe_layers()):
            for k, v in m.last_stats.items():
                out[f"moe{i}/{k}"] = v
        return out
