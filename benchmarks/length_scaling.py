"""Cost against sequence length: training and inference throughput and peak GPU memory of each
model family at lengths 50 to 8,192, same width, same number of tokens per batch.

For every (model, length N): batch B = tokens // N full-length sequences (random items, rising
timestamps); a training step is forward + the sampled-softmax loss (128 negatives) + backward +
AdamW step; inference is a no-grad forward plus the scores of the last position against every
item. Times are medians after warm-up, bracketed by ``torch.cuda.synchronize()``; peak memory is
``torch.cuda.max_memory_allocated`` from a reset, per phase. A model that runs out of memory at a
length "does not fit" there and is not tried at longer lengths.

    PYTHONPATH=src python benchmarks/length_scaling.py --out $OUT/length_scaling
    PYTHONPATH=src python benchmarks/length_scaling.py --device cpu --lengths 50,128 --quick

Writes ``benchmarks/results/length_scaling-<device>-<commit>.json``, a Markdown table next to
it, and a log-log plot (``.png``) when matplotlib is installed (docs/performance.md).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.config import ModelConfig, MoEConfig  # noqa: E402
from fuxi_mme.models import build_model  # noqa: E402
from fuxi_mme.models.ssm import SelectiveSSM  # noqa: E402
from fuxi_mme.models.ssm_scan import resolve_scan  # noqa: E402
from fuxi_mme.train.loss import sample_negatives, sampled_softmax_loss  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402

LENGTHS = (50, 128, 256, 512, 1024, 2048, 4096, 8192)
NUM_ITEMS = 10_000


def model_config(name: str, dim: int, layers: int) -> ModelConfig:
    """Each benchmarked model at width ``dim``: two heads of dim / 2 where there is attention."""
    heads = dict(num_heads=2, qk_dim=dim // 2, v_dim=dim // 2)
    moe = MoEConfig(num_experts=4, top_k=2)
    table: dict[str, dict[str, Any]] = {
        "sasrec": dict(name="sasrec", num_heads=2, ffn_dim=dim),
        "fuxi-alpha": dict(name="fuxi-alpha", attention="reference", **heads),
        "fuxi-alpha-fused": dict(name="fuxi-alpha", attention="fused", **heads),
        "fuxi-mme": dict(name="fuxi-mme", num_embeddings=2, moe=moe, **heads),
        "ssm": dict(name="ssm"),
        "fuxi-alpha-hybrid": dict(name="fuxi-alpha", mixer="hybrid", attention="reference", **heads),
        "fuxi-mme-hybrid": dict(name="fuxi-mme", mixer="hybrid", num_embeddings=2, moe=moe, **heads),
    }
    if name not in table:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(table)}")
    return ModelConfig(dim=dim, num_layers=layers, dropout=0.2, **table[name])


def inputs(B: int, N: int, dev: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_ITEMS + 1, (B, N + 1), generator=g)
    ts = torch.cumsum(torch.randint(1, 86_400, (B, N + 1), generator=g), 1)
    negatives = sample_negatives((B, N, 128), NUM_ITEMS, "cpu", g)
    return tuple(t.to(dev) for t in (ids[:, :N], ts[:, :N], ts[:, 1:], ids[:, 1:], negatives))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, steps: int, warmup: int, dev: torch.device, slow_s: float) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls; one timed call when a warm-up call took
    longer than ``slow_s`` (keeps the sweep's wall time bounded)."""
    times = []
    for i in range(warmup + steps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        elif dt > slow_s:
            warmup, steps = i + 1, 1
    return statistics.median(times)


def peak_gb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


def scan_of(model: torch.nn.Module, dev: torch.device) -> str | None:
    """The selective-scan implementation the model's state-space mixers run on ``dev`` in eager
    mode (``model.ssm_scan`` resolved), or None for a model without them."""
    paths = sorted({resolve_scan(m.scan, dev) for m in model.modules() if isinstance(m, SelectiveSSM)})
    return ",".join(paths) or None


def measure(name: str, N: int, args, dev: torch.device) -> dict[str, Any]:
    """One (model, length) cell: throughputs and peak memory, or why it did not run."""
    B = max(1, args.tokens // N)
    row: dict[str, Any] = {"model": name, "length": N, "batch": B, "tokens": B * N}
    cfg = model_config(name, args.dim, args.layers)
    if cfg.attention == "fused" and dev.type != "cuda":
        return {**row, "fits": None, "skipped": "the fused attention needs a CUDA GPU"}
    torch.manual_seed(0)
    model = build_model(cfg, NUM_ITEMS, N).to(dev)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["scan"] = scan_of(model, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    ids, ts, q, targets, negatives = inputs(B, N, dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            user = model(ids, ts, q)
            loss = sampled_softmax_loss(user.float(), targets, model.item_vectors().float(), negatives, 0.05)
            aux = model.aux_loss()
        (loss + (aux if aux is not None else 0)).backward()
        model.release_aux_graphs()
        opt.step()

    def infer() -> None:
        with torch.no_grad(), amp:
            user = model(ids, ts, q)[:, -1]
            (user.float() @ model.item_vectors().float().T).topk(10)

    try:
        model.train()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = timed(train_step, args.steps, args.warmup, dev, args.slow_s)
        row.update(train_step_ms=round(t * 1e3, 3), train_tokens_per_s=round(B * N / t, 1), train_peak_gb=peak_gb(dev))
        opt.zero_grad(set_to_none=True)
        model.eval()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = timed(infer, args.steps, args.warmup, dev, args.slow_s)
        row.update(infer_ms=round(t * 1e3, 3), infer_tokens_per_s=round(B * N / t, 1), infer_peak_gb=peak_gb(dev), fits=True)
    except torch.OutOfMemoryError:
        row.update(fits=False, error="out of memory")
    except RuntimeError as exc:  # a failure of one cell is recorded, the sweep goes on
        row.update(fits=None, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return row


def release(dev: torch.device) -> None:
    """Free what the last cell held (its model, optimizer and activations went out of scope)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def fmt_cell(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return "skipped"
    if r["fits"] is False:
        return "OOM" if r.get("error") else "—"
    if r["fits"] is None:
        return "error"
    mem = f", {r['train_peak_gb']:.1f} GB" if r.get("train_peak_gb") is not None else ""
    return f"{r['train_tokens_per_s'] / 1e3:,.0f}k / {r['infer_tokens_per_s'] / 1e3:,.0f}k{mem}"


def table(rows: list[dict[str, Any]], lengths: list[int], models: list[str]) -> list[str]:
    by = {(r["model"], r["length"]): r for r in rows}
    md = [
        "| model | scan | " + " | ".join(f"N={n}" for n in lengths) + " | longest that fits |",
        "|---|---|" + "---|" * (len(lengths) + 1),
    ]
    for m in models:
        fits = [n for n in lengths if by.get((m, n), {}).get("fits")]
        longest = str(max(fits)) if fits else "none"
        if fits and max(fits) == max(lengths):
            longest = f">= {max(fits)}"
        scan = next((r["scan"] for r in rows if r["model"] == m and r.get("scan")), None) or "—"
        md.append(f"| {m} | {scan} | " + " | ".join(fmt_cell(by[(m, n)]) if (m, n) in by else "—" for n in lengths) + f" | {longest} |")
    return md


def plot(rows: list[dict[str, Any]], models: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [
        ("train_tokens_per_s", "training tokens/s"),
        ("infer_tokens_per_s", "inference tokens/s"),
        ("train_peak_gb", "training peak memory (GiB)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (key, label) in zip(axes, keys):
        for m in models:
            pts = [(r["length"], r[key]) for r in rows if r["model"] == m and r.get("fits") and r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--models", default="sasrec,fuxi-alpha,fuxi-alpha-fused,fuxi-mme,ssm,fuxi-alpha-hybrid,fuxi-mme-hybrid")
    p.add_argument("--tokens", type=int, help="tokens per batch (batch = tokens // length); default 32,768 (2,048 with --quick)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--amp", choices=("none", "bf16"), default="bf16", help="bf16 autocast (GPU; ignored on the CPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slow-s", type=float, default=3.0, help="a warm-up step slower than this: time one step only")
    p.add_argument("--quick", action="store_true", help="one warm-up and one timed step (smoke test)")
    p.add_argument("--out", help="output path without suffix (default benchmarks/results/length_scaling-<device>-<commit>)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 1, 1
    if args.tokens is None:
        args.tokens = 2048 if args.quick else 32_768
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if dev.type != "cuda":
        args.amp = "none"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    lengths = [int(x) for x in args.lengths.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    info = run_info(dev)
    rows = []
    t0 = time.perf_counter()
    for m in models:
        oom = False
        for n in lengths:
            if oom:
                rows.append({"model": m, "length": n, "batch": max(1, args.tokens // n), "fits": False, "after_oom_at_shorter_length": True})
                continue
            r = measure(m, n, args, dev)
            release(dev)
            oom = r["fits"] is False
            rows.append(r)
            scan = f" [scan {r['scan']}]" if r.get("scan") else ""
            print(f"{m:>18} N={n:>5}: {fmt_cell(r)}{scan}" + (f" ({r['error']})" if r.get("error") else ""), flush=True)
    wall = round(time.perf_counter() - t0, 1)
    config = {k: getattr(args, k) for k in ("tokens", "dim", "layers", "amp", "steps", "warmup", "slow_s")}
    config.update(lengths=lengths, models=models, num_items=NUM_ITEMS, negatives=128, wall_s=wall)
    out = Path(args.out or RESULTS / f"length_scaling-{card(info)}-{(info['commit'] or 'unknown')[:7]}")
    md = [
        f"# Cost against sequence length ({info['device'].get('gpu') or 'cpu'}, commit {info['commit']})",
        "",
        f"Width {args.dim}, {args.layers} layers, {args.tokens:,} tokens per batch (batch = tokens // N), amp {args.amp}, "
        f"{NUM_ITEMS:,} items, sampled softmax with 128 negatives. Cells: training / inference tokens per second"
        " (median after warm-up) and the training step's peak memory; OOM: does not fit; scan: the selective scan the"
        " state-space mixers ran (model.ssm_scan resolved on this device). torch "
        f"{info['versions']['torch']}; {wall} s in all.",
        "",
        *table(rows, lengths, models),
    ]
    payload = {"benchmark": "length_scaling", **info, "config": config, "rows": rows}
    path = save(out, payload, md)
    if plot(rows, models, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    print(f"results: {path} ({wall} s)")


if __name__ == "__main__":
    main()
