"""Small builders the trainer is assembled from: optimizer, schedule, the metrics log, and the
execution choices (compile, length chunks) resolved from the config and the model's needs."""

from __future__ import annotations

import json
import logging
import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..models.common import SequenceModel

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.betas[0], t.betas[1]), weight_decay=t.weight_decay, fused=fused)


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
            self.tb.flush()  # a record per epoch: on disk at once, the final test record too


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


def compile_mode(cfg: Config, model: SequenceModel, device: torch.device, distributed: bool) -> str | None:
    """``train.compile`` resolved: "always" (every step compiled), "graphs" (only the CUDA-graph
    step: ``auto`` on single-process CUDA with CUDA graphs wanted and triton importable, unless
    ``train.deterministic``: Inductor's scatter kernels add atomically, or the model says it must
    not be compiled inside graphs) or None."""
    c = cfg.train.compile
    problem = model.graph_compile_problem()
    if c is True:
        if problem and device.type == "cuda" and cfg.train.cuda_graphs != "off":
            log.warning("train.compile=true: %s (docs/training.md); use train.compile=auto or train.cuda_graphs=off", problem)
        return "always"
    if c is False or device.type != "cuda" or distributed or cfg.train.cuda_graphs == "off" or cfg.train.deterministic:
        return None
    if problem:
        log.info("train.compile=auto: not compiling (%s; docs/training.md)", problem)
        return None
    return "graphs" if find_spec("triton") is not None else None
