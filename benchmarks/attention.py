"""Attention alone: the PyTorch reference against the fused Triton kernel, forward + backward.

Shapes are the base presets' (batch 128, length 200): q/k/v as the FuXi block produces them,
random temporal buckets, the full causal sequence. Times are CUDA-event medians after warm-up;
peak memory is measured per path from a reset. Also checks that both paths agree before timing.

    PYTHONPATH=src python benchmarks/attention.py --shapes ml-20m ml-1m --dtype bf16

Writes ``benchmarks/results/attention-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fuxi_mme.models.attention import fuxi_attention_reference, hstu_attention_reference  # noqa: E402
from fuxi_mme.presets import build_preset, preset_name  # noqa: E402
from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402


def inputs(shape: str, model: str, B: int, dtype, dev):
    cfg = build_preset(preset_name(shape, model, "base"))
    m = cfg.model
    N, H, Dq, Dv = cfg.data.max_len, m.num_heads, m.qk_dim, m.v_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dev, dtype).requires_grad_(True)  # noqa: E731
    q, k, v = mk(B, H, N, Dq), mk(B, H, N, Dq), mk(B, H, N, Dv)
    pos = (torch.randn(N, generator=g) * 0.02).to(dev).requires_grad_(True)
    tw = (torch.randn(m.num_time_buckets + 1, generator=g) * 0.02).to(dev).requires_grad_(True)
    bk = torch.randint(0, m.num_time_buckets + 1, (B, N, N), generator=g).to(dev)
    return (q, k, v, pos, tw, bk), float(N), dict(B=B, N=N, H=H, qk_dim=Dq, v_dim=Dv)


def timed(fn, args, norm, steps, warmup, dev):
    grad = None
    times = []
    for i in range(warmup + steps):
        for a in args[:5]:
            a.grad = None
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = fn(*args, norm)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        if dev.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["ml-20m", "ml-1m"])
    ap.add_argument("--models", nargs="+", default=["fuxi-alpha", "hstu"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    from fuxi_mme.models import fused_attention as fa

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    info = run_info(dev)
    rows = []
    for shape in args.shapes:
        for model in args.models:
            ref_fn = fuxi_attention_reference if model == "fuxi-alpha" else hstu_attention_reference
            fused_fn = fa.fused_fuxi_attention if model == "fuxi-alpha" else fa.fused_hstu_attention
            a, norm, dims = inputs(shape, model, args.batch, dtype, dev)
            with torch.no_grad():
                err = (fused_fn(*a, norm).float() - ref_fn(*a, norm).float()).abs().max().item()
            rec = {"shape": shape, "model": model, "dtype": args.dtype, **dims, "max_abs_diff": err}
            for name, fn in (("reference", ref_fn), ("fused", fused_fn)):
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                rec[f"{name}_ms"] = timed(fn, a, norm, args.steps, args.warmup, dev)
                if dev.type == "cuda":
                    rec[f"{name}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            rec["speedup"] = rec["reference_ms"] / rec["fused_ms"]
            rows.append(rec)
            print(rec, flush=True)
    out = Path(args.out or RESULTS / f"attention-{card(info)}")
    md = [f"# Attention forward + backward, {card(info)}, torch {info['versions'].get('torch')}, commit {info['commit']}", "",
          "| shape | model | B x N, H, qk/v | dtype | reference ms | fused ms | speedup | reference peak GB | fused peak GB | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['model']} | {r['B']} x {r['N']}, {r['H']}, {r['qk_dim']}/{r['v_dim']} | {r['dtype']} | {r['reference_ms']:.2f} | {r['fused_ms']:.2f} | "
                  f"{r['speedup']:.2f}x | {r.get('reference_peak_gb', 0):.3f} | {r.get('fused_peak_gb', 0):.3f} | {r['max_abs_diff']:.2e} |")
    save(out, {"benchmark": "attention", **info, "results": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
