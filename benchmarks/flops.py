"""Arithmetic of one training step: the floating-point operations of the matrix products
(``torch.utils.flop_counter``: matmul, bmm, linear, attention) in the library's real training
step (``Trainer.forward_backward``: forward, loss and backward) of each model's base preset on
the synthetic ML-1M / ML-20M shapes of ``throughput.py``, averaged over a few batches.

It answers what bounds a throughput ratio that the profile finds GPU-busy: if model A does r
times model B's products per sequence, A at B's efficiency runs at 1/r of B's sequences per
second. Element-wise work (norms, activations, the attention's bias tables) is not counted;
the count does not depend on the device, so it runs on the CPU.

    PYTHONPATH=src python benchmarks/flops.py                       # ML-1M and ML-20M, FuXi-alpha and Fuxi-MME
    PYTHONPATH=src python benchmarks/flops.py --shapes ml-1m --steps 2

Writes ``benchmarks/results/flops-<shapes>.json`` and the Markdown table next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, save  # noqa: E402
from fuxi_mme.config import apply_overrides  # noqa: E402
from fuxi_mme.presets import build_preset, preset_name  # noqa: E402
from fuxi_mme.utils.runinfo import git_commit, versions  # noqa: E402
from throughput import make_trainer, synthetic  # noqa: E402

# Fuxi-MME's first defaults (heads and experts at width d/M, one shared decoder): the ML-1M
# presets ship the wider decoder chosen on validation (docs/models.md#decoder-capacity)
FIRST_DEFAULTS = ["model.shared_decoder=true", "model.ffn_multiply=1", "model.qk_dim=25", "model.v_dim=25"]
VARIANTS = {  # label: (model, overrides, shapes it applies to)
    "fuxi-alpha": ("fuxi-alpha", [], ("ml-1m", "ml-20m")),
    "fuxi-mme": ("fuxi-mme", [], ("ml-1m", "ml-20m")),
    # each expert on its routed tokens only (the reference loop): the sparse top-k arithmetic
    "fuxi-mme, routed tokens only": ("fuxi-mme", ["model.moe.backend=loop"], ("ml-1m", "ml-20m")),
    "fuxi-mme, first defaults": ("fuxi-mme", FIRST_DEFAULTS, ("ml-1m",)),
}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["ml-1m", "ml-20m"], choices=["ml-1m", "ml-20m"])
    ap.add_argument("--steps", type=int, default=4, help="batches counted per model (their mean)")
    ap.add_argument("--batch-size", type=int, help="rows per batch (default: the preset's)")
    ap.add_argument("--out", help="results file (default benchmarks/results/flops-<shapes>.json)")
    return ap.parse_args(argv)


def count(shape: str, model: str, overrides: list[str], ds, steps: int, batch_size: int | None) -> dict:
    """Mean matrix-product FLOPs of one training step of ``model``'s base preset, and per sequence."""
    cfg = build_preset(preset_name(shape, model, "base"))
    # the eager fp32 step; the MoE back end of the default fp32 GPU path (dense at these widths)
    apply_overrides(cfg, ["train.device=cpu", "train.compile=false", "train.cuda_graphs=off", *overrides])
    if batch_size:
        apply_overrides(cfg, [f"train.batch_size={batch_size}"])
    tr = make_trainer(cfg, ds, torch.device("cpu"))
    order = tr._epoch_order(0)
    B = cfg.train.batch_size
    per_step = []
    for i in range(steps):
        rows = order[i * B : (i + 1) * B]
        with FlopCounterMode(display=False) as fc:
            tr.forward_backward(rows)
        tr.zero_grad()
        per_step.append(fc.get_total_flops())
    flops = sum(per_step) / len(per_step)
    moe = next((m.last_path for m in tr.model.modules() if hasattr(m, "last_path")), None)
    params = sum(p.numel() for p in tr.model.parameters())
    return {"batch_size": B, "gflop_per_step": flops / 1e9, "mflop_per_sequence": flops / B / 1e6, "moe_path": moe, "params": params}


def main(argv: list[str] | None = None) -> Path:
    args = _parse_args(argv)
    rows = []
    for shape in args.shapes:
        ds = synthetic(shape)
        base = None
        for label, (model, overrides, shapes) in VARIANTS.items():
            if shape not in shapes:
                continue
            r = {"shape": shape, "variant": label, "overrides": overrides, **count(shape, model, overrides, ds, args.steps, args.batch_size)}
            base = base if base is not None else r["mflop_per_sequence"]
            r["vs_fuxi_alpha"] = r["mflop_per_sequence"] / base
            r["throughput_bound"] = 1 / r["vs_fuxi_alpha"]
            rows.append(r)
            print(f"{shape} {label}: {r['mflop_per_sequence']:.1f} MFLOP a sequence, {r['vs_fuxi_alpha']:.2f}x FuXi-alpha", flush=True)
    head = {"commit": (git_commit() or "unknown")[:7], "versions": versions(), "steps": args.steps}
    lines = [
        f"# Matrix-product arithmetic of one training step (commit {head['commit']})",
        "",
        "`benchmarks/flops.py`: `torch.utils.flop_counter` over `Trainer.forward_backward` (forward, loss, backward) of each "
        "base preset, eager fp32, the MoE back end that `auto` picks on a GPU in fp32 (dense: every expert on every token) "
        f"unless the row says otherwise; mean of {args.steps} batches of the synthetic shapes of `throughput.py`. "
        "Element-wise work is not counted. Throughput bound: FuXi-alpha's sequences per second times 1 / (the ratio), "
        "if both ran their products at the same efficiency.",
        "",
        "| shape | model | batch | GFLOP a step | MFLOP a sequence | vs FuXi-alpha | throughput at equal efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['variant']} | {r['batch_size']} | {r['gflop_per_step']:.1f} | {r['mflop_per_sequence']:.1f} | "
            f"{r['vs_fuxi_alpha']:.2f}x | {r['throughput_bound']:.0%} |"
        )
    out = Path(args.out) if args.out else RESULTS / f"flops-{'-'.join(args.shapes)}.json"
    return save(out, {**head, "rows": rows}, lines)


if __name__ == "__main__":
    print(main())
