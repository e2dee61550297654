"""Where a training step's time goes: a torch.profiler breakdown of the library's real step.

Same step and synthetic data as ``throughput.py`` (``Trainer.loss_for_rows`` + backward +
AdamW). For each (shape, model, path) it records:

* wall time per step and GPU busy time per step (sum of kernel durations): when the GPU is
  busy for much less than the wall time, the step is bound by the host (Python, launches);
* GPU time per kernel category (matrix products, Triton kernels, elementwise, reductions,
  indexing/scatter, sort, optimizer, copies) and the top kernels;
* kernel launches per step;
* host-device synchronisations inside the step, counted with
  ``torch.cuda.set_sync_debug_mode("warn")``.

    PYTHONPATH=src python benchmarks/profile_step.py --shapes ml-1m ml-20m --models fuxi-alpha fuxi-mme

Writes ``benchmarks/results/profile-<device>.json`` and ``.md``. GPU only.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402
from fuxi_mme.utils.runtime import setup_device  # noqa: E402
from throughput import make_trainer, path_label, synthetic, train_step, what_ran  # noqa: E402

CATEGORIES = [  # first match wins
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("triton (fused)", r"^triton|_kernel$|fwd|bwd_kv|bwd_q"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|wgmma|matmul|splitk|sm90|sm80|ampere|hopper"),
    ("sort", r"sort|radix"),
    ("index/scatter/gather", r"index|scatter|gather|embedding"),
    ("reduction", r"reduce|norm|softmax|logsumexp|sum"),
    ("copy", r"copy|memcpy|memset|cat"),
    ("elementwise", r"elementwise|vectorized|unrolled|launch_kernel"),
]


def category(name: str) -> str:
    n = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, n):
            return cat
    return "other"


def count_syncs(tr, rows) -> int:
    """Host-device synchronisations during one step (warnings from the sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(tr, rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def profile_one(cfg, ds, dev, steps: int, warmup: int) -> dict:
    tr = make_trainer(cfg, ds, dev)
    order = tr._epoch_order(0)
    B = cfg.train.batch_size
    batches = [order[(i * B) % (len(order) - B) :][:B] for i in range(warmup + steps)]
    for rows in batches[:warmup]:
        train_step(tr, rows)
    torch.cuda.synchronize()
    syncs = count_syncs(tr, batches[0])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for rows in batches[warmup:]:
            train_step(tr, rows)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[ev.name]
            k[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            k[1] += 1
    cats: dict[str, float] = defaultdict(float)
    for name, (us, _) in per_kernel.items():
        cats[category(name)] += us
    busy_ms = sum(v[0] for v in per_kernel.values()) / 1e3 / steps
    launches = sum(v[1] for v in per_kernel.values()) / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:40]
    return {
        **what_ran(tr),  # a compile that fell back shows here (its profile is the plain model's)
        "wall_ms_per_step": wall * 1e3,
        "gpu_busy_ms_per_step": busy_ms,
        "gpu_busy_share": busy_ms / (wall * 1e3),
        "kernels_per_step": launches,
        "syncs_per_step": syncs,
        "categories_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": c / steps} for n, (us, c) in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["ml-1m", "ml-20m"])
    ap.add_argument("--models", nargs="+", default=["fuxi-alpha", "fuxi-mme"])
    ap.add_argument("--paths", nargs="+", default=["fp32", "bf16", "fast"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tf32", default="off", choices=("off", "on"), help="as throughput.py: off = strict fp32, on = as `fuxi-mme train` runs")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py profiles CUDA kernels; run it on a GPU machine")
    from throughput import path_config

    dev = setup_device("cuda", tf32=args.tf32 == "on")
    info = run_info(dev)
    rows = []
    for shape in args.shapes:
        ds = synthetic(shape)
        for model in args.models:
            for path in args.paths:
                cfg = path_config(shape, model, path, dev)
                r = {"shape": shape, "model": model, "path": path, "preset": cfg.preset, **profile_one(cfg, ds, dev, args.steps, args.warmup)}
                rows.append(r)
                cats = ", ".join(f"{k} {v:.2f}" for k, v in r["categories_ms_per_step"].items())
                print(
                    f"{shape} {model} {path_label(r)}: wall {r['wall_ms_per_step']:.2f} ms, GPU busy {r['gpu_busy_ms_per_step']:.2f} ms "
                    f"({100 * r['gpu_busy_share']:.0f}%), {r['kernels_per_step']:.0f} kernels, {r['syncs_per_step']} syncs | {cats}",
                    flush=True,
                )
    out = Path(args.out or RESULTS / f"profile-{card(info)}")
    cat_names = [c for c, _ in CATEGORIES] + ["other"]
    md = [
        f"Device: {info['device'].get('gpu')}; torch {info['versions']['torch']}, CUDA {info['versions']['cuda']}; commit `{info['commit']}`; "
        f"TF32 {args.tf32}. "
        "Milliseconds per training step (GPU kernel time by category).",
        "",
        "| shape | model | path | wall ms | GPU busy ms | busy % | kernels | syncs | " + " | ".join(cat_names) + " |",
        "|---" * (8 + len(cat_names)) + "|",
    ]
    for r in rows:
        c = r["categories_ms_per_step"]
        md.append(
            f"| {r['shape']} | {r['model']} | {path_label(r)} | {r['wall_ms_per_step']:.2f} | {r['gpu_busy_ms_per_step']:.2f} "
            f"| {100 * r['gpu_busy_share']:.0f} | "
            f"{r['kernels_per_step']:.0f} | {r['syncs_per_step']} | " + " | ".join(f"{c.get(n, 0):.2f}" for n in cat_names) + " |"
        )
    md += ["", "Top kernels:", ""]
    for r in rows:
        md.append(
            f"- {r['shape']} {r['model']} {r['path']}: " + "; ".join(f"`{k['name'][:60]}` {k['ms_per_step']:.2f} ms" for k in r["top_kernels"][:6])
        )
    print(save(out, {"benchmark": "profile_step", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info, "results": rows}, md))


if __name__ == "__main__":
    main()
