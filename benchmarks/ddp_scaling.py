"""Multi-GPU scaling: training throughput of 1 vs N processes (DDP, NCCL on GPU, gloo on CPU).

Run it without torchrun; it launches ``torchrun --nproc_per_node=n`` for each n in
``--nprocs`` and times the library's real distributed step (``Trainer.loss_for_rows`` through
the DDP-wrapped model, backward with gradient all-reduce, AdamW step) on synthetic data shaped
like ML-1M (the same generator as ``throughput.py``). Each rank synchronises its device, then
the ranks meet at a barrier, so a step's time is the slowest rank's. Two regimes:

* ``strong``: the global batch stays at the preset's 128, split over the ranks;
* ``weak``: each rank keeps 128 sequences (global batch 128 x n).

Scaling efficiency = (seq/s with n processes) / (n x seq/s with 1 process).

    PYTHONPATH=src python benchmarks/ddp_scaling.py --nprocs 1 2 --amp bf16

Writes ``benchmarks/results/ddp-<model>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(args) -> None:
    from fuxi_mme.config import apply_overrides
    from fuxi_mme.models import build_model
    from fuxi_mme.presets import build_preset, preset_name
    from fuxi_mme.train import distributed as D
    from fuxi_mme.train.loop import Trainer
    from fuxi_mme.utils.runtime import train_device
    from throughput import synthetic

    info = D.from_env()
    cfg = build_preset(preset_name("ml-1m", args.model, "base"))
    per_rank = args.batch if args.regime == "weak" else args.batch // max(info.world, 1)
    apply_overrides(cfg, [f"train.batch_size={per_rank * info.world}", f"train.amp={args.amp}", "log.progress=false", f"train.device={args.device}"])
    device = train_device(cfg.train, info.local_rank if info.enabled else None)
    D.init(info, device, 300)
    ds = synthetic("ml-1m")
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(device)
    tr = Trainer(cfg, ds, model, device, None, progress=False, dist_info=info)
    model.train()
    order = tr._epoch_order(0)
    B = cfg.train.batch_size
    times = []
    for i in range(args.warmup + args.steps):
        rows = order[(i * B) % (len(order) - B) :][:B]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        D.barrier(info)
        t0 = time.perf_counter()
        loss, aux = tr.loss_for_rows(rows)
        (loss + aux if aux is not None else loss).backward()
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        D.barrier(info)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if info.main:
        med = statistics.median(times)
        rec = {
            "nproc": info.world,
            "regime": args.regime,
            "global_batch": B,
            "per_rank_batch": B // info.world,
            "step_ms_median": med * 1e3,
            "step_ms_p90": float(np.percentile(times, 90)) * 1e3,
            "seq_per_s": B / med,
            "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "loss_last": float(loss),
        }
        Path(args.result).write_text(json.dumps(rec))
    D.shutdown()


def _torchrun(args, regime: str, n: int) -> dict:
    """One regime at ``n`` processes under torchrun: the worker's result record."""
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__, "--worker"]
        cmd += ["--result", str(res), "--model", args.model, "--amp", args.amp, "--regime", regime, "--batch", str(args.batch)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if p.returncode != 0:
            print(p.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"torchrun with {n} processes failed")
        return json.loads(res.read_text())


def _markdown(args, info: dict, rows: list[dict], card) -> list[str]:
    md = [
        f"# DDP scaling, {card(info)} ({info['device'].get('gpu_count', 1)} visible), torch {info['versions'].get('torch')}, commit {info['commit']}",
        "",
        f"ml-1m-{args.model}-base on synthetic ML-1M-shaped data, amp={args.amp}; median of {args.steps} steps after {args.warmup} warm-up.",
        "",
        "| regime | processes | global batch | per-rank batch | step ms | seq/s | speedup | efficiency | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['regime']} | {r['nproc']} | {r['global_batch']} | {r['per_rank_batch']} | {r['step_ms_median']:.1f} | {r['seq_per_s']:,.0f} | "
            f"{r['speedup']:.2f}x | {100 * r['efficiency']:.0f}% | {r['gpu_mem_gb'] or 0:.2f} |"
        )
    return md


def driver(args) -> None:
    from common import RESULTS, card, save
    from fuxi_mme.utils.runinfo import run_info
    from fuxi_mme.utils.runtime import resolve_device

    dev = resolve_device(args.device)
    info = run_info(dev)
    rows = []
    for regime in args.regimes:
        for n in args.nprocs:
            rec = _torchrun(args, regime, n)
            rec.update(model=args.model, amp=args.amp)
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    for r in rows:
        base = (
            next(x for x in rows if x["regime"] == r["regime"] and x["nproc"] == 1)
            if any(x["nproc"] == 1 and x["regime"] == r["regime"] for x in rows)
            else None
        )
        r["speedup"] = r["seq_per_s"] / base["seq_per_s"] if base else None
        r["efficiency"] = r["speedup"] / r["nproc"] if base else None
    out = Path(args.out or RESULTS / f"ddp-{args.model}-{card(info)}")
    payload = {
        "benchmark": "ddp_scaling",
        "data": "synthetic ML-1M shape (6,040 users, 3,706 items, 1,000,209 interactions)",
        "preset": f"ml-1m-{args.model}-base",
        **info,
        "results": rows,
    }
    md = _markdown(args, info, rows, card)
    save(out, payload, md)
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--regime", default="strong", help=argparse.SUPPRESS)
    ap.add_argument("--regimes", nargs="+", default=["strong", "weak"])
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="fuxi-alpha")
    ap.add_argument("--amp", default="bf16", choices=("none", "bf16"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
