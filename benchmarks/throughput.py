"""Training and evaluation throughput on synthetic data shaped like ML-1M / ML-20M.

Times the library's real training step (``Trainer.forward_backward``, i.e. ``train/step.py``'s
``loss_and_backward`` eager or replayed from a CUDA graph, + AdamW step, batches
built by ``make_batch`` from the padded arrays) and the full-ranking evaluator. Step times are
medians after warm-up, bracketed by ``torch.cuda.synchronize()`` on GPU. Every path is
compared with the fp32 reference path of the same model measured in the same run.

    PYTHONPATH=src python benchmarks/throughput.py --shapes ml-1m ml-20m --models fuxi-alpha fuxi-mme

Writes ``benchmarks/results/throughput-<device>.json`` and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.config import apply_overrides  # noqa: E402
from fuxi_mme.data.prepared import PreparedDataset, compute_stats  # noqa: E402
from fuxi_mme.data.splits import eval_arrays  # noqa: E402
from fuxi_mme.eval.evaluator import evaluate_ranks, model_scorer  # noqa: E402
from fuxi_mme.models import build_model  # noqa: E402
from fuxi_mme.models.moe import PERSISTENT_REDUCTIONS, PERSISTENT_REDUCTIONS_ENV  # noqa: E402
from fuxi_mme.presets import build_preset, preset_name  # noqa: E402
from fuxi_mme.train.loop import Trainer  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402
from fuxi_mme.utils.runtime import setup_device  # noqa: E402

# docs/models.md#dataset-statistics: users, items, interactions (mean length = interactions / users).
SHAPES = {"ml-1m": (6040, 3706, 1_000_209), "ml-20m": (138_493, 26_744, 20_000_263)}


def synthetic(shape: str, seed: int = 0) -> PreparedDataset:
    """Users with lognormal lengths (min 20, as MovieLens) matching the mean; Zipf items."""
    U, I, nnz = SHAPES[shape]
    rng = np.random.default_rng(seed)
    mean = nnz / U
    sigma = 1.0
    lens = np.maximum(20, rng.lognormal(np.log(mean - 20) - sigma**2 / 2, sigma, U).astype(np.int64) + 20)
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    p = 1.0 / np.arange(1, I + 1) ** 0.8
    items = rng.choice(np.arange(1, I + 1), size=int(offsets[-1]), p=p / p.sum())
    ts = np.cumsum(rng.integers(1, 3600, size=int(offsets[-1])))
    ds = PreparedDataset(f"synthetic-{shape}", offsets, items, ts, np.arange(I + 1), np.arange(U), True)
    ds.stats = compute_stats(ds)
    return ds


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


PATHS = {  # name: (amp, attention, CUDA graphs, MoE back end, length chunks, torch.compile)
    "fp32": ("none", "reference", "off", "batched", "1", "false"),  # the reference path
    "bf16": ("bf16", "reference", "off", "batched", "1", "false"),
    "fused-bf16": ("bf16", "fused", "off", "batched", "1", "false"),
    "dense-bf16": ("bf16", "reference", "off", "dense", "1", "false"),
    "graph-bf16": ("bf16", "reference", "on", "dense", "1", "false"),
    "fast": ("bf16", "fused", "on", "dense", "1", "false"),  # graphs + the fused Triton attention
    "grouped-graph-bf16": ("bf16", "reference", "on", "batched", "1", "false"),  # grouped GEMM where it applies
    "default": ("none", "auto", "auto", "auto", "auto", "auto"),  # what `fuxi-mme train` does with no options
    "default-bf16": ("bf16", "auto", "auto", "auto", "auto", "auto"),  # the same with --amp bf16
    "chunked-bf16": ("bf16", "reference", "off", "dense", "4", "false"),  # eager, rows in 4 length-sorted chunks
    "chunked-graph-bf16": ("bf16", "reference", "on", "dense", "4", "false"),  # the same chunks, each replayed from a graph
    # torch.compile'd model inside the graphs (compile auto: only the graphed steps are compiled)
    "compiled-graph-bf16": ("bf16", "reference", "on", "dense", "1", "auto"),
    "compiled-grouped-graph-bf16": ("bf16", "reference", "on", "batched", "1", "auto"),
    "compiled-chunked-graph-bf16": ("bf16", "reference", "on", "dense", "4", "auto"),
    "compiled-fast": ("bf16", "fused", "on", "auto", "1", "auto"),  # default-bf16 with the fused Triton attention
    # the same with FuXi's bias channels as matrix products outside the kernels (fused_attention.BIAS_CHANNELS)
    "compiled-fast-split": ("bf16", "fused+matmul", "on", "auto", "1", "auto"),
}


def path_config(shape: str, model: str, path: str, dev):
    """The base preset of ``model`` at ``shape`` on one measured path (``PATHS``)."""
    cfg = build_preset(preset_name(shape, model, "base"))
    amp, attention, graphs, moe, chunks, compiled = PATHS[path]
    attention, _, bias = attention.partition("+")
    set_bias_channels(bias or "kernel")
    sets = [
        f"train.device={dev}",
        f"train.amp={amp}",
        f"model.attention={attention}",
        f"train.cuda_graphs={graphs}",
        f"model.moe.backend={moe}",
        f"train.length_chunks={chunks}",
        f"train.compile={compiled}",
    ]
    apply_overrides(cfg, sets)
    return cfg


def set_bias_channels(mode: str) -> None:
    """Where the fused FuXi attention computes its bias channels for the paths that follow (a
    module setting, not a config field, while it is being measured; the module imports
    without triton)."""
    from fuxi_mme.models.attention import fused as fa

    fa.BIAS_CHANNELS = mode


def use_launch_tables(path: str) -> dict:
    """Replace the fused attention's launch settings with the ``launch_tables`` of an
    ``attention.py --sweep`` results file; returns them (to be recorded)."""
    from fuxi_mme.models.attention import fused as fa

    try:
        tables = json.loads(Path(path).read_text())["launch_tables"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(
            f"--launch {path}: cannot read launch_tables from it ({e}); give the JSON that benchmarks/attention.py --sweep wrote"
        ) from None
    for kind, kernels in tables.items():
        if kind not in fa.LAUNCH:
            raise SystemExit(f"--launch {path}: unknown kernel variant {kind!r} (known: {sorted(fa.LAUNCH)})")
        fa.LAUNCH[kind].update({k: tuple(v) for k, v in kernels.items()})
    return tables


def make_trainer(cfg, ds, dev) -> Trainer:
    # a fresh compiler state per measured path: code compiled for an earlier model or path
    # (and dynamo's per-function cache limit) must not decide whether this one compiles
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(dev)
    tr = Trainer(cfg, ds, model, dev, None, progress=False)
    model.train()
    return tr


def what_ran(tr: Trainer) -> dict:
    """Whether the measured steps were graphed and compiled as their path asked, and the MoE path."""
    return {
        "cuda_graphs_used": tr.graphed is not None and not tr.graphed.disabled and bool(tr.graphed.graphs),
        "moe_path": next((m.last_path for m in tr.model.modules() if hasattr(m, "last_path")), None),
        "compiled": tr.compile,  # None, "graphs" (the graphed steps) or "always"
        # False where a compiled model failed to capture and the plain one was graphed instead
        "compiled_kept": tr.compile != "graphs" or (tr.graphed is not None and tr.graphed.compiled),
        # Inductor's persistent reductions in the compiled model: off for MoE models unless
        # the environment sets them (the model's compile_options)
        "persistent_reductions": persistent_reductions(tr) if tr.compile else None,
    }


def persistent_reductions(tr: Trainer) -> bool:
    import torch._inductor.config as inductor_config

    options = tr.model.compile_options() or {}
    return bool(options.get(PERSISTENT_REDUCTIONS, inductor_config.triton.persistent_reductions))


def train_step(tr: Trainer, rows) -> torch.Tensor:
    """One optimizer step of the library's training loop on the global batch ``rows``."""
    loss, _ = tr.forward_backward(rows)
    tr.opt.step()
    tr.zero_grad()
    return loss


def bench_train(cfg, ds, dev, steps: int, warmup: int, epoch: bool = False) -> dict:
    """Median synchronised step time after ``warmup`` steps (which include any compilation and
    graph capture, timed as ``warmup_s``); with ``epoch``, also one whole training epoch timed
    as the training loop runs it (``Trainer.train_epoch``: no synchronisation between steps, so
    the host prepares the next batch while the GPU runs)."""
    tr = make_trainer(cfg, ds, dev)
    model = tr.model
    order = tr._epoch_order(0)
    B = cfg.train.batch_size
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, tokens = [], []
    sync(dev)
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        rows = order[(i * B) % (len(order) - B) :][:B]
        sync(dev)
        t0 = time.perf_counter()
        loss = train_step(tr, rows)
        sync(dev)
        if i == warmup - 1:
            warmup_s = time.perf_counter() - t_start
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(int(tr.train_arrs.lengths[rows].sum()))
    med = statistics.median(times)
    out = {
        "step_ms_median": med * 1e3,
        "step_ms_p90": float(np.percentile(times, 90)) * 1e3,
        "seq_per_s": B / med,
        "tokens_per_s": float(np.mean(tokens)) / med,
        "steps_per_epoch": tr.steps_per_epoch,
        "epoch_s_projected": tr.steps_per_epoch * med,
        "loss_last": float(loss.detach()),
        **what_ran(tr),
        # chunks the timed steps really ran in (the graphed step keeps one pass for MoE models)
        "length_chunks": tr.graphed.chunks if tr.graphed is not None and not tr.graphed.disabled else tr.length_chunks,
        "warmup_s": warmup_s if warmup else 0.0,
    }
    if epoch:
        sync(dev)
        t0 = time.perf_counter()
        tr.train_epoch(1)
        sync(dev)
        dt = time.perf_counter() - t0
        out.update(epoch_s_measured=dt, epoch_seq_per_s=len(tr.train_arrs) / dt)
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    ev = eval_arrays(ds, "paper", "test", cfg.data.max_len)
    model.eval()
    scorer = model_scorer(model, tr.amp_dtype)
    evaluate_ranks(scorer, ev, ds, "mask", 2048, dev, rows=np.arange(min(2048, len(ev))))  # warm-up
    sync(dev)
    t0 = time.perf_counter()
    evaluate_ranks(scorer, ev, ds, "mask", 2048, dev)
    sync(dev)
    dt = time.perf_counter() - t0
    out.update(eval_users=len(ev), eval_s=dt, eval_users_per_s=len(ev) / dt)
    return out


def path_label(r: dict) -> str:
    """The path's name, and what it really ran where that differs from its name."""
    notes = []
    asked = PATHS[r["path"]][2]
    if asked == "on" and r.get("cuda_graphs_used") is False:
        notes.append("graphs refused: eager")
    elif asked == "auto" and "cuda_graphs_used" in r:
        notes.append("graphs" if r["cuda_graphs_used"] else "eager")
    compiled = r.get("compiled")
    if compiled and r.get("compiled_kept") is False:
        notes.append("compile fell back: plain model graphed")
    elif compiled and not r["path"].startswith("compiled"):
        notes.append("compiled")
    elif r["path"].startswith("compiled") and "compiled" in r and not compiled:
        notes.append("not compiled")
    if r.get("persistent_reductions") is False:
        notes.append("no persistent reductions")
    if r.get("length_chunks", 1) > 1:
        notes.append(f"{r['length_chunks']} length chunks")
    if r.get("moe_path"):
        notes.append(f"MoE {r['moe_path']}")
    return r["path"] + (f" ({', '.join(notes)})" if notes else "")


def speedup_cell(r: dict) -> str:
    """Seq/s against the fp32 reference of the same model in the same run; a run without one
    names the path it was compared with instead."""
    base = r.get("speedup_base", "fp32")
    return f"{r['speedup_vs_reference']:.2f}x" + ("" if base == "fp32" else f" (vs {base}, no fp32 run)")


def write(results: list[dict], info: dict, out_arg: str | None) -> Path:
    """JSON + Markdown table of the results so far (rewritten after every measurement)."""
    out = Path(out_arg) if out_arg else RESULTS / f"throughput-{card(info)}.json"
    lines = [
        f"Device: {info['device'].get('gpu', 'cpu')}; torch {info['versions']['torch']}, CUDA {info['versions']['cuda']}; commit `{info['commit']}`"
        + (f"; TF32 {'on' if info['device']['tf32'] else 'off (strict fp32)'}." if "tf32" in info["device"] else "."),
        "",
        "| shape | model | path | seq/s | tokens/s | step ms (median) | projected epoch s | measured epoch s (seq/s) "
        "| warm-up s | peak GB | eval users/s | vs fp32 reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        whole = f"{r['epoch_s_measured']:.1f} ({r['epoch_seq_per_s']:,.0f})" if "epoch_s_measured" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['model']} | {path_label(r)} | {r['seq_per_s']:,.0f} | {r['tokens_per_s']:,.0f} "
            f"| {r['step_ms_median']:.1f} | {r['epoch_s_projected']:.1f} | {whole} | "
            f"{r.get('warmup_s', 0):.0f} | {r.get('peak_mem_gb', 0):.2f} | {r['eval_users_per_s']:,.0f} | {speedup_cell(r)} |"
        )
    save(out, {"benchmark": "throughput", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info, "results": results}, lines)
    return out.with_suffix(".json")


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["ml-1m", "ml-20m"])
    ap.add_argument("--models", nargs="+", default=["fuxi-alpha", "fuxi-mme"])
    ap.add_argument(
        "--paths",
        nargs="+",
        default=["fp32", "bf16", "fast"],
        choices=list(PATHS),
        help="fp32 = reference; bf16 = autocast; fused-bf16 = + Triton attention; dense-bf16 = + dense MoE; graph-bf16 = + CUDA graphs; "
        "fast = all of them; grouped-graph-bf16 = graphs with the grouped-GEMM experts; default = no options (fp32, auto); "
        "chunked-bf16 = eager bf16 in 4 length-sorted chunks; chunked-graph-bf16 = the same with CUDA graphs (one pass for MoE models); "
        "compiled-* = torch.compile inside the graphs (compiled-fast: with the fused attention; "
        "compiled-fast-split: FuXi's bias channels as matrix products outside the kernels); default-bf16 = default with --amp bf16",
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--tf32",
        default="off",
        choices=("off", "on"),
        help="fp32 matmuls on a GPU: off = strict fp32 (torch's default; every throughput figure so far), "
        "on = TF32 on the tensor cores, as `fuxi-mme train` runs (train.tf32=true)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--epoch", action="store_true", help="also time one whole training epoch (no syncs between steps)")
    ap.add_argument(
        "--launch",
        help="an attention.py --sweep results JSON: time the fused attention with its launch_tables "
        "(recorded in the results) instead of fused_attention.LAUNCH",
    )
    ap.add_argument(
        "--persistent-reductions",
        choices=["auto", "on", "off"],
        default="auto",
        help="Inductor's persistent reductions in compiled paths: auto = the library's choice (off for MoE models), "
        "on / off = set TORCHINDUCTOR_PERSISTENT_REDUCTIONS for every model",
    )
    return ap.parse_args()


def _bench_paths(args, shape: str, model: str, ds, dev, results: list[dict], info: dict) -> None:
    """Every path of one shape and model, the fp32 reference first so every other path is
    compared with it; the results file is rewritten after each."""
    ref = None
    for path in sorted(args.paths, key=lambda p: p != "fp32"):
        cfg = path_config(shape, model, path, dev)
        r = {
            "shape": shape,
            "model": model,
            "path": path,
            "preset": cfg.preset,
            "config": cfg.to_dict(),
            **bench_train(cfg, ds, dev, args.steps, args.warmup, epoch=args.epoch),
        }
        if ref is None:
            ref = r
        r["speedup_vs_reference"] = r["seq_per_s"] / ref["seq_per_s"]
        r["speedup_base"] = ref["path"]
        whole = f", measured epoch {r['epoch_s_measured']:.1f} s ({r['epoch_seq_per_s']:.0f} seq/s)" if "epoch_s_measured" in r else ""
        print(
            f"{shape} {model} {path}: {r['seq_per_s']:.0f} seq/s, step {r['step_ms_median']:.1f} ms, "
            f"epoch {r['epoch_s_projected']:.1f} s{whole}, "
            f"eval {r['eval_users_per_s']:.0f} users/s, mem {r.get('peak_mem_gb', 0):.2f} GB",
            flush=True,
        )
        results.append(r)
        write(results, info, args.out)


def main() -> None:
    args = _parse_args()
    if args.persistent_reductions != "auto":
        import torch._inductor.config as inductor_config

        os.environ[PERSISTENT_REDUCTIONS_ENV] = "1" if args.persistent_reductions == "on" else "0"
        inductor_config.triton.persistent_reductions = args.persistent_reductions == "on"
    launch = use_launch_tables(args.launch) if args.launch else None
    dev = setup_device(args.device, tf32=args.tf32 == "on")
    info = run_info(dev)  # its device record names the TF32 setting
    if launch is not None:
        info["launch_tables"] = {"from": args.launch, **launch}
    results: list[dict] = []
    for shape in args.shapes:
        ds = synthetic(shape)
        for model in args.models:
            _bench_paths(args, shape, model, ds, dev, results, info)
    print(write(results, info, args.out))


if __name__ == "__main__":
    main()
