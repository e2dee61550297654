"""Attention alone: the PyTorch reference against the fused Triton kernel, forward + backward.

Shapes are the base presets' (batch 128, length 200): q/k/v as the FuXi block produces them,
random temporal buckets; each sequence's real length drawn from the shape's length
distribution (padding after it, as in every training batch; ``--full-length``: none). Times are CUDA-event medians after warm-up;
peak memory is measured per path from a reset. Also checks that both paths agree before timing.

Paths: ``reference`` (PyTorch, eager: what the 3x target is measured against),
``reference-compiled`` (the same function under ``torch.compile``, which is what the compiled
training step runs) and ``fused`` (the Triton kernels). For the fused path the time is also
split into its parts: the forward kernel, the two backward kernels and the bias-table
gradients (``parts``). ``--sweep`` first times each kernel under every launch setting in
``SWEEP`` (tile rows, warps, stages; each kernel's GPU time from ten launches replayed in one
CUDA graph), keeps the fastest per kernel for the rest of the run and records the whole table,
so the settings in ``fused_attention.LAUNCH`` come from a measurement. ``--kernels`` adds every
kernel of the fused path with its GPU time (torch.profiler). The JSON's
``launch_tables`` can be handed to ``throughput.py --launch`` to time training with them.

    PYTHONPATH=src python benchmarks/attention.py --shapes ml-20m ml-1m --dtype bf16 [--sweep]

Writes ``benchmarks/results/attention-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from attention_tables import kernel_tables, results_table, sweep_tables  # noqa: E402
from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.models.attention import fuxi_attention_reference, hstu_attention_reference  # noqa: E402
from fuxi_mme.presets import build_preset, preset_name  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402


def batch_lengths(shape: str, B: int, max_len: int, seed: int = 0) -> torch.Tensor:
    """Real positions of B training sequences drawn from the synthetic dataset of ``shape``
    (the users and sequence-length distribution of docs/models.md#dataset-statistics, as ``throughput.py``)."""
    from fuxi_mme.data.splits import train_arrays
    from throughput import synthetic

    ds = synthetic(shape)
    lens = train_arrays(ds, build_preset(preset_name(shape, "fuxi-alpha", "base")).data.protocol, max_len).lengths
    rng = np.random.default_rng(seed)
    return torch.from_numpy(lens[rng.choice(len(lens), B, replace=False)].astype(np.int64))


def inputs(shape: str, model: str, B: int, dtype, dev):
    cfg = build_preset(preset_name(shape, model, "base"))
    m = cfg.model
    N, H, Dq, Dv = cfg.data.max_len, m.num_heads, m.qk_dim, m.v_dim
    groups = 1
    if model == "fuxi-mme":
        groups = m.num_embeddings  # the shared decoder runs its M streams as extra heads of one call (FuxiBlock groups)
        H *= groups
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dev, dtype).requires_grad_(True)  # noqa: E731
    q, k, v = mk(B, H, N, Dq), mk(B, H, N, Dq), mk(B, H, N, Dv)
    pos = (torch.randn(N, generator=g) * 0.02).to(dev).requires_grad_(True)
    tw = (torch.randn(m.num_time_buckets + 1, generator=g) * 0.02).to(dev).requires_grad_(True)
    bk = torch.randint(0, m.num_time_buckets + 1, (B, N, N), generator=g).to(dev)
    return (q, k, v, pos, tw, bk), float(N), dict(B=B, N=N, H=H, qk_dim=Dq, v_dim=Dv, groups=groups)


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


def _event_ms(fn, steps: int, warmup: int) -> float:
    """CUDA-event median of ``fn()`` (no autograd)."""
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graphed_calls_ms(fn, steps: int, warmup: int, reps: int = 10) -> float:
    """GPU milliseconds of one ``fn()``: ``reps`` calls recorded back to back in one CUDA graph,
    the replay timed and divided by ``reps``, so no launch latency from the host enters (with
    one eager launch between two events, the host's launch time counts, and at these kernel
    lengths, 0.1-0.3 ms, it spreads the figures by tens of percent)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()  # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return _event_ms(graph.replay, steps, warmup) / reps


def _kernel_args(fa, a, norm, hstu, split=False, lengths=None):
    """The fused kernels' own inputs, prepared as ``fused_attention._attention`` does."""
    q, k, v, pos, tw, bk = a
    q, k, v = (t.detach().contiguous() for t in (q, k, v))
    with torch.no_grad():
        pmap, tmap = fa.bias_maps(pos, tw, bk, q.shape[2], q.dtype)
    do = torch.randn(q.shape[0], q.shape[2], fa._channels(hstu, split), q.shape[1], v.shape[-1], device=q.device, dtype=q.dtype)
    return (q, k, v, pmap, tmap), do, 1.0 / norm


def fused_parts(fa, a, norm, hstu, steps, warmup, lengths=None) -> dict:
    """Milliseconds of each part of the fused forward + backward, each timed alone (eager)."""
    base, do, inv = _kernel_args(fa, a, norm, hstu)
    q, k, v, pmap, tmap = base
    _, gp = fa.launch_bwd_q(*base, do, inv, hstu, lengths=lengths)

    pos, tw, bk = a[3].detach(), a[4].detach(), a[5]

    def tables():  # the bias maps, and the tables' gradients (``fused_attention.table_grads``)
        fa.bias_maps(pos, tw, bk, q.shape[2], q.dtype)
        fa.table_grads(v, do, gp, pos.shape[0], bk, tw.shape[0], hstu, lengths)

    return {
        "fwd": _graphed_calls_ms(lambda: fa.launch_fwd(*base, inv, hstu, lengths=lengths), steps, warmup),
        "bwd_kv": _graphed_calls_ms(lambda: fa.launch_bwd_kv(*base, do, inv, hstu, lengths=lengths), steps, warmup),
        "bwd_q": _graphed_calls_ms(lambda: fa.launch_bwd_q(*base, do, inv, hstu, lengths=lengths), steps, warmup),
        "bias_tables": _graphed_calls_ms(tables, steps, warmup),
    }


def kernel_breakdown(fn, args, norm, calls: int = 5) -> list[dict]:
    """GPU time of every kernel in one forward + backward of ``fn`` (torch.profiler, ``calls``
    eager calls after a warm-up call, averaged), longest first: where the time of a path goes."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        for a in args[:5]:
            a.grad = None
        out = fn(*args, norm)
        out.backward(torch.ones_like(out))

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    per: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = per.setdefault(ev.name, [0.0, 0])
            k[0] += ev.device_time_total
            k[1] += 1
    return [{"name": n[:100], "ms": us / 1e3 / calls, "calls": c / calls} for n, (us, c) in sorted(per.items(), key=lambda kv: -kv[1][0])]


def graphed_ms(fn, args, norm, steps: int, warmup: int) -> float:
    """Forward + backward recorded once in a CUDA graph and replayed: the GPU time alone, with
    no Python or launch overhead (as inside the graphed training step)."""
    grad = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in args[:5]:
                t.grad = None
            out = fn(*args, norm)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args, norm)
        out.backward(grad)
    return _event_ms(graph.replay, steps, warmup)


# Launch settings tried by --sweep: (BM, BN, num_warps, num_stages)
SWEEP = [(bm, bn, w, st) for bm, bn in ((32, 32), (32, 64), (64, 32), (64, 64), (128, 64), (64, 128)) for w, st in ((4, 2), (4, 3), (8, 2))]


def sweep(fa, a, norm, hstu, steps, warmup, split=False, lengths=None) -> dict:
    """Every launch setting of every kernel, timed alone (``_graphed_calls_ms``); returns
    {kernel: [(setting, ms, error)]}."""
    base, do, inv = _kernel_args(fa, a, norm, hstu, split)
    calls = {
        "fwd": lambda: fa.launch_fwd(*base, inv, hstu, split, lengths),
        "bwd_kv": lambda: fa.launch_bwd_kv(*base, do, inv, hstu, split, lengths),
        "bwd_q": lambda: fa.launch_bwd_q(*base, do, inv, hstu, split, lengths),
    }
    if not hstu and not split:  # FuXi-alpha's table gradients (their own table, "fuxi-bias")
        calls["bias_grad"] = lambda: fa.launch_bias_grad(base[2], do, a[5], lengths, 1, a[3].shape[0], a[4].shape[0])  # noqa: E731
    out = {}
    for name, call in calls.items():
        table = fa.LAUNCH[fa.bias_launch_kind(base[2].shape[-1]) if name == "bias_grad" else fa.launch_kind(hstu, split, base[2].shape[-1])]
        keep = table[name]
        rows = []
        for setting in SWEEP:
            table[name] = setting
            try:
                ms = _graphed_calls_ms(call, steps, warmup)
            except Exception as e:  # e.g. out of shared memory for this tile size
                rows.append((list(setting), None, type(e).__name__))
                continue
            rows.append((list(setting), ms, ""))
        table[name] = keep
        out[name] = rows
    return out


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["ml-20m", "ml-1m"])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["fuxi-alpha", "hstu"],
        choices=("fuxi-alpha", "fuxi-mme", "hstu"),
        help="fuxi-mme: FuXi attention at Fuxi-MME's shape (M streams as extra heads of half the width)",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="time every launch setting of each kernel first and use the fastest")
    ap.add_argument(
        "--full-length",
        action="store_true",
        help="every sequence N long (no padding); default: lengths drawn from the shape's distribution, padding after",
    )
    ap.add_argument("--kernels", action="store_true", help="also record every kernel's GPU time in the fused path (torch.profiler)")
    ap.add_argument("--out")
    return ap.parse_args()


def _with_lengths(fn, lengths, groups):
    return lambda q, k, v, p, t, b, norm: fn(q, k, v, p, t, b, norm, lengths, groups)


def _run_sweeps(fa, args, dtype, dev, lengths_for) -> dict:
    """Sweep at the first shape, per model; the fastest setting of each kernel is kept in the
    table of its variant and head width (FuXi: also the semantic-only kernels of the split
    variant, their own tables; Fuxi-MME's heads of 32 have their own, "-d32")."""
    sweeps = {}
    shape = args.shapes[0]
    for model in args.models:
        hstu = model == "hstu"
        a, norm, dims = inputs(shape, model, args.batch, dtype, dev)
        for split in (False,) if hstu else (False, True):
            table = sweep(fa, a, norm, hstu, max(5, args.steps // 2), 3, split, lengths_for(shape, dims["N"]))
            sweeps[f"{shape}/{model}" + ("/split" if split else "")] = table
            for name, rows_ in table.items():
                dv = a[2].shape[-1]
                launch = fa.LAUNCH[fa.bias_launch_kind(dv) if name == "bias_grad" else fa.launch_kind(hstu, split, dv)]
                best = min((r for r in rows_ if r[1] is not None), key=lambda r: r[1])
                print(
                    f"sweep {shape} {model}{' split' if split else ''} {name}: best {best[0]} {best[1]:.3f} ms; was {list(launch[name])}",
                    flush=True,
                )
                launch[name] = tuple(best[0])
    print("launch settings used:", fa.LAUNCH, flush=True)
    return sweeps


def _measure(fa, args, shape, model, dtype, dev, lengths_for) -> dict:
    """One shape and model: the paths' agreement, times (eager, compiled, graphed) and peak memory."""
    hstu = model == "hstu"
    cuda = dev.type == "cuda"
    ref_fn = hstu_attention_reference if hstu else fuxi_attention_reference
    fused_fn = fa.fused_hstu_attention if hstu else fa.fused_fuxi_attention
    a, norm, dims = inputs(shape, model, args.batch, dtype, dev)
    lengths = lengths_for(shape, dims["N"])
    with torch.no_grad():
        err = (fused_fn(*a, norm, lengths, dims["groups"]).float() - ref_fn(*a, norm, lengths, dims["groups"]).float()).abs().max().item()
    dv = a[2].shape[-1]
    rec = {
        "shape": shape,
        "model": model,
        "dtype": args.dtype,
        **dims,
        "max_abs_diff": err,
        "lengths": "full" if lengths is None else {"mean": float(lengths.float().mean()), "min": int(lengths.min()), "max": int(lengths.max())},
        "launch": {k: list(v) for k, v in fa.LAUNCH[fa.launch_kind(hstu, False, dv)].items()},
        **({} if hstu else {"launch_split": {k: list(v) for k, v in fa.LAUNCH[fa.launch_kind(hstu, True, dv)].items()}}),
    }
    paths = [("reference", ref_fn), ("fused", fused_fn)]
    if not hstu:  # FuXi's bias channels as products outside the kernels (fused_attention.BIAS_CHANNELS = "matmul")
        paths.append(("fused_split", functools.partial(fa.fused_fuxi_attention, split=True)))
    if cuda:
        torch._dynamo.reset()
        paths.insert(1, ("reference_compiled", torch.compile(ref_fn)))
    paths = [(name, _with_lengths(fn, lengths, dims["groups"])) for name, fn in paths]
    for name, fn in paths:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rec[f"{name}_ms"] = timed(fn, a, norm, args.steps, args.warmup, dev)
        if cuda:
            rec[f"{name}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    rec["speedup"] = rec["reference_ms"] / rec["fused_ms"]
    if cuda:
        _measure_graphed(fa, args, rec, paths, a, norm, hstu, lengths)
    return rec


def _measure_graphed(fa, args, rec, paths, a, norm, hstu, lengths) -> None:
    """On a GPU: the fused path's parts, every path replayed in a CUDA graph, and (--kernels)
    the fused path's kernels."""
    rec["speedup_vs_compiled"] = rec["reference_compiled_ms"] / rec["fused_ms"]
    rec["parts"] = fused_parts(fa, a, norm, hstu, args.steps, args.warmup, lengths)
    for name, fn in paths:
        if name != "reference_compiled":
            rec[f"{name}_graphed_ms"] = graphed_ms(fn, a, norm, args.steps, args.warmup)
    rec["speedup_graphed"] = rec["reference_graphed_ms"] / rec["fused_graphed_ms"]
    if args.kernels:
        rec["fused_kernels"] = kernel_breakdown(dict(paths)["fused"], a, norm)
    if "fused_split_graphed_ms" in rec:
        rec["speedup_split_graphed"] = rec["reference_graphed_ms"] / rec["fused_split_graphed_ms"]


def main() -> None:
    args = _parse_args()
    from fuxi_mme.models.attention import fused as fa

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    info = run_info(dev)
    lens: dict = {}  # shape -> (B,) lengths on the device, or None

    def lengths_for(shape, N):
        if shape not in lens:
            lens[shape] = None if args.full_length else batch_lengths(shape, args.batch, N).to(dev)
        return lens[shape]

    sweeps = _run_sweeps(fa, args, dtype, dev, lengths_for) if args.sweep and dev.type == "cuda" else {}
    rows = []
    for shape in args.shapes:
        for model in args.models:
            rec = _measure(fa, args, shape, model, dtype, dev, lengths_for)
            rows.append(rec)
            print(rec, flush=True)
    out = Path(args.out or RESULTS / f"attention-{card(info)}")
    md = results_table(rows, info)
    for kind, launch in fa.LAUNCH.items():
        md += ["", f"Launch settings for {kind} (BM, BN, warps, stages): " + ", ".join(f"{k} {tuple(v)}" for k, v in launch.items())]
    md += sweep_tables(sweeps) + kernel_tables(rows)
    tables = {kind: {k: list(v) for k, v in launch.items()} for kind, launch in fa.LAUNCH.items()}
    save(out, {"benchmark": "attention", **info, "results": rows, "sweeps": sweeps, "launch_tables": tables}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
