"""Cost at scale: preparing, training on and evaluating synthetic logs of 1e6 to 1e9
interactions (docs/performance.md#scale).

The log: 2% as many users as events and 1% as many items (at most 1e7), lognormal history
lengths (sigma 1, at least 3), items drawn Zipf-like (log-uniform ranks: item r has weight
~1/r), increasing timestamps per user, and 1% of events an exact repeat of the user's
previous one (a double-logged click). It is written as Parquet parts, out of core. Phases,
each in its own process so that its peak host memory (``ru_maxrss``) is its own (for
``prepare``, whose sort pass runs in worker processes, the larger of that and the sampled
resident memory of the whole process tree):

* ``prepare``: the real ``fuxi-mme data prepare`` with ``data.engine=columnar``
  (``--duplicates keep`` or ``drop``: exact duplicate rows allowed or dropped);
* ``train``: the real trainer's step (``Trainer.forward_backward`` + optimizer) for
  ``--steps`` steps after ``--warmup`` steps, on the prepared (memory-mapped) data;
  one epoch is **extrapolated** from the measured steps and labelled so;
* ``eval``: one full-ranking evaluation (``Trainer.evaluate``) of every user with a test
  target, on the untrained model (the cost does not depend on the weights). On a CPU it runs
  only up to ``--cpu-eval-max`` interactions; larger sizes are marked not run.

    PYTHONPATH=src python benchmarks/scale.py --sizes 1e6,1e7,1e8,1e9 --work /big/disk   # GPU host
    PYTHONPATH=src python benchmarks/scale.py --sizes 1e6 --steps 3 --quick               # smoke run

Writes ``benchmarks/results/scale-<card>.json``, the Markdown table and a log-log plot next to
it, with each phase's growth exponent (the least-squares slope of log cost on log size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402

PART_ROWS = 1 << 24  # rows per generated Parquet part
DUP_RATE = 0.01  # share of events that repeat the previous one exactly (a double-logged click)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7,1e8,1e9", help="interactions per log, comma-separated")
    ap.add_argument("--phases", default="prepare,train,eval")
    ap.add_argument("--work", default=str(ROOT / ".scale"), help="folder for the logs and the prepared caches (needs ~40 GB at 1e9)")
    ap.add_argument("--keep", action="store_true", help="keep the generated logs and caches")
    ap.add_argument("--duplicates", default="drop", choices=("keep", "drop"), help="exact duplicate rows: allowed (keep) or dropped")
    ap.add_argument("--model", default="fuxi-alpha")
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eval-batch", type=int, default=4096, help="users per evaluation batch (eval.batch_size)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--tf32", default="on", choices=("on", "off"), help="TF32 matmuls on a GPU (train.tf32: on, the library's default; off: strict fp32)"
    )
    ap.add_argument("--cpu-eval-max", type=float, default=1e7, help="on a CPU, evaluate only logs up to this many interactions")
    ap.add_argument("--quick", action="store_true", help="small model and few steps (a smoke run)")
    ap.add_argument("--out", help="results file (default benchmarks/results/scale-<card>.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one phase in this process
    ap.add_argument("--size", type=float, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def shape(n: int) -> dict[str, int]:
    return {"interactions": n, "users": max(10, n // 50), "items": max(10, min(n // 100, 10_000_000))}


def generate(n: int, folder: Path, seed: int = 0, dup_rate: float = DUP_RATE, workers: int | None = None) -> dict:
    """The synthetic log of ``n`` interactions as Parquet parts in ``folder`` (reused if
    complete); a ``dup_rate`` share of events repeats the user's previous event exactly. The
    history lengths are drawn once; each part (a run of whole users) draws its own events from
    its own seed ``(seed, part)``, in ``workers`` processes (default: the cores, at most 8)."""
    import numpy as np

    done = folder / "_DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    s = shape(n)
    rng = np.random.default_rng(seed)
    lens = np.maximum(3, rng.lognormal(0.0, 1.0, s["users"]))
    lens = np.maximum(3, np.round(lens * (n / lens.sum()))).astype(np.int64)
    lens[-1] += n - lens.sum()  # exactly n events (the last user absorbs the rounding)
    if lens[-1] < 3:
        lens[-1] = 3
    ends = np.cumsum(lens)
    bounds, u0 = [], 0
    while u0 < s["users"]:
        u1 = int(np.searchsorted(ends, (ends[u0 - 1] if u0 else 0) + PART_ROWS, side="right"))
        u1 = max(u1, u0 + 1)
        bounds.append((u0, u1))
        u0 = u1
    jobs = [(folder / f"part-{p:05d}.parquet", (seed, p), u0, lens[u0:u1], s["items"], dup_rate) for p, (u0, u1) in enumerate(bounds)]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            dups = sum(ex.map(_write_part, *zip(*jobs)))
    else:
        dups = sum(_write_part(*j) for j in jobs)
    size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
    info = {**s, "duplicates": dups, "parts": len(jobs), "generate_s": time.perf_counter() - t0, "bytes": size, "workers": workers}
    done.write_text(json.dumps(info))
    return info


def _write_part(path: Path, seed: tuple[int, int], u0: int, ln, items: int, dup_rate: float) -> int:
    """One part: users ``u0 ..`` with history lengths ``ln``; returns its duplicate count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(list(seed))
    m, nu = int(ln.sum()), len(ln)
    user = np.repeat(np.arange(u0, u0 + nu, dtype=np.int32), ln)
    item = (np.exp(rng.random(m) * math.log(items + 1)) - 1).astype(np.int32)  # log-uniform rank: weight ~ 1/r
    start = rng.integers(1_500_000_000, 1_600_000_000, nu)
    gaps = rng.geometric(1 / 3600, m).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(ln)[:-1]])
    gaps[first] = 0
    ts = np.cumsum(gaps)
    ts = ts - np.repeat(ts[first], ln) + np.repeat(start, ln)
    dup = rng.random(m) < dup_rate
    dup[first] = False
    dup[1:] &= ~dup[:-1]  # never two in a row: each one copies an original event
    dup = np.flatnonzero(dup)
    item[dup], ts[dup] = item[dup - 1], ts[dup - 1]
    order = rng.permutation(m)  # rows not grouped by user: the file order of a raw log
    pq.write_table(pa.table({"user": user[order], "item": item[order], "timestamp": ts[order]}), path, row_group_size=1 << 20)
    return len(dup)


def _maxrss_gb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / 1e9  # KiB on Linux


def _data_args(n: int, work: Path, duplicates: str) -> tuple[list[str], dict]:
    over = {
        "data.engine": "columnar",
        "data.duplicates": duplicates,
        "data.user_col": "user",
        "data.item_col": "item",
        "data.time_col": "timestamp",
    }
    return ["--source", str(work / f"log-{n:.0e}"), "--data-dir", str(work / "data")], over


def run_prepare(n: int, work: Path, duplicates: str) -> dict:
    """The real CLI, in a child process whose peak memory is read after it ends."""
    args, over = _data_args(n, work, duplicates)
    cmd = [sys.executable, "-m", "fuxi_mme", "data", "prepare", f"scale-{n:.0e}", *args, "--rebuild"]
    for k, v in over.items():
        cmd += ["--set", f"{k}={v}"]
    probe = "import resource, subprocess, sys, json, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    probe += "print(json.dumps({'rc': r.returncode, 's': time.perf_counter() - t, 'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-c", probe, *cmd], stdout=out, stderr=err, text=True, env=env)
        tree_peak = 0  # the sort pass runs in worker processes: their memory adds up
        while p.poll() is None:
            tree_peak = max(tree_peak, _tree_rss_bytes(p.pid))
            time.sleep(0.1)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0 or not stdout.strip():
        raise RuntimeError(f"prepare failed: {stderr[-2000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise RuntimeError(f"prepare failed (rc {r['rc']}): {stderr[-2000:]}")
    meta = _cache_meta(work, n)
    largest = r["kib"] * 1024 / 1e9
    return {
        "s": r["s"],
        "peak_host_gb": max(largest, tree_peak / 1e9),
        "largest_process_gb": largest,
        "process_tree_gb": tree_peak / 1e9,
        "passes_s": meta.get("prepare", {}),
        "stats": _brief(meta["stats"]),
    }


def _pss(proc: Path, page: int) -> int:
    """A process's proportional set size (shared pages split between their users, so a tree's
    sum counts each page once), else its resident size."""
    try:
        for line in (proc / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int((proc / "statm").read_text().split()[1]) * page


def _tree_rss_bytes(root: int) -> int:
    """Memory of ``root`` and every process below it, now (Pss; Linux /proc; 0 elsewhere)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d.name)] = _pss(d, page)
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [c for c, par in parents.items() if par in frontier and c not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(q, 0) for q in tree)


def _cache_meta(work: Path, n: int) -> dict:
    metas = sorted((work / "data" / "prepared").glob(f"scale-{n:.0e}-*/meta.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(metas[-1].read_text())


def _brief(st: dict) -> dict:
    return {k: st[k] for k in ("users", "items", "interactions", "seq_len_mean")} | {"notes": st.get("notes", [])}


def _trainer(n: int, args: argparse.Namespace):
    import torch

    from fuxi_mme.config import apply_overrides
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.presets import build_preset, preset_name
    from fuxi_mme.train.loop import Trainer
    from fuxi_mme.utils.runtime import train_device

    work = Path(args.work)
    dargs, over = _data_args(n, work, args.duplicates)
    cfg = build_preset(preset_name("file", args.model, "base"))
    sets = {
        **over,
        "data.name": f"scale-{n:.0e}",
        "data.path": dargs[1],
        "data.data_dir": dargs[3],
        "data.max_len": args.max_len,
        "model.dim": args.dim,
        "train.batch_size": args.batch_size,
        "eval.batch_size": args.eval_batch,
        "eval.beyond": False,  # ranks only: the fused ranking where it runs (eval.ranking=auto)
        "train.device": args.device,
        "train.tf32": args.tf32 == "on",
        "train.cuda_graphs": "off",
        "train.compile": False,
        "log.progress": False,
    }
    apply_overrides(cfg, [f"{k}={v}" for k, v in sets.items()])
    device = train_device(cfg.train)  # as `fuxi-mme train` sets it up (TF32)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    load_s = time.perf_counter() - t0
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(device)
    tr = Trainer(cfg, ds, model, device, None, progress=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return tr, device, load_s, cfg


def step_parts(tr, order, B: int, first: int, steps: int, sync) -> dict[str, float]:
    """Where a training step's time goes, over ``steps`` more steps, each part synchronised
    (so they need not add up to the overlapped step above): building the batch on the host
    (gathering the rows from the mapped cache, drawing negatives, copying to the device),
    forward + loss + backward, and the optimizer (AdamW over every parameter, the whole item
    table included, then zeroing the gradients). Milliseconds a step."""
    from fuxi_mme.train.step import loss_and_backward

    per_epoch = max(1, len(order) // B)
    parts = {"batch": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    for i in range(first, first + steps):
        j = i % per_epoch
        t0 = time.perf_counter()
        batches, normalizer = tr._batches(order[j * B : (j + 1) * B])
        sync()
        t1 = time.perf_counter()
        loss_and_backward(tr.forward_module, tr.model, batches, normalizer, tr.settings)
        sync()
        t2 = time.perf_counter()
        tr.opt.step()
        tr.zero_grad()
        sync()
        t3 = time.perf_counter()
        parts["batch"] += t1 - t0
        parts["forward_backward"] += t2 - t1
        parts["optimizer"] += t3 - t2
    return {k: 1e3 * v / steps for k, v in parts.items()}


def worker(args: argparse.Namespace) -> dict:
    """One phase in this process: ``train`` or ``eval`` (the evaluator's progress lines on
    stderr)."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("fuxi_mme.eval.evaluator").setLevel(logging.DEBUG)

    n = int(args.size)
    tr, device, load_s, cfg = _trainer(n, args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict = {"load_s": load_s, "train_rows": len(tr.train_arrs), "eval_users": len(tr.test_arrs)}
    if args.worker == "train":
        order = tr._epoch_order(0)
        B = cfg.train.batch_size

        def step(i: int) -> None:
            tr.forward_backward(order[i * B : (i + 1) * B])
            tr.opt.step()
            tr.zero_grad()

        for i in range(args.warmup):
            step(i)
        sync()
        t0 = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        out.update(step_s=dt, steps_per_epoch=tr.steps_per_epoch, epoch_s_extrapolated=dt * tr.steps_per_epoch, seq_per_s=B / dt)
        out["step_parts_ms"] = step_parts(tr, order, B, args.warmup + args.steps, args.steps, sync)
    else:
        from fuxi_mme.eval.evaluator import model_scorer, resolve_ranking

        t0 = time.perf_counter()
        m = tr.evaluate(tr.test_arrs, "test")
        sync()
        ranking = resolve_ranking(cfg.eval.ranking, model_scorer(tr.model), device, cfg.eval.beyond)
        out.update(s=time.perf_counter() - t0, ndcg10=float(m.get("NDCG@10", float("nan"))), ranking=ranking)
    out["peak_host_gb"] = _maxrss_gb()
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def run_worker(phase: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", phase, "--size", str(n), "--work", args.work, "--duplicates", args.duplicates]
    cmd += ["--model", args.model, "--dim", str(args.dim), "--max-len", str(args.max_len), "--batch-size", str(args.batch_size)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--eval-batch", str(args.eval_batch)]
    cmd += ["--tf32", args.tf32]
    err_path = Path(args.work) / f"{phase}-{n:.0e}.err"  # the worker's log, progress lines included, readable while it runs
    with open(err_path, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if p.returncode != 0:  # recorded, not raised: the other phases and sizes keep their numbers
        why = "killed (out of memory?)" if p.returncode < 0 else (err_path.read_text().strip().splitlines() or ["?"])[-1]
        return {"failed": f"exit {p.returncode}: {why}", "peak_host_gb": _maxrss_gb(resource.RUSAGE_CHILDREN)}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _rankings(records: dict) -> str:
    """How the evaluations ranked (eval.ranking resolved), e.g. ``fused``."""
    got = sorted({r["eval"].get("ranking", "?") for r in records.values() if r.get("eval") and "failed" not in r["eval"]})
    return "/".join(got) or "none"


def exponents(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(cost) on log(interactions) over the sizes that have it."""
    import numpy as np

    pts = [(r["interactions"], r[key]) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    x, y = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


COLUMNS = [
    ("prepare_s", "prepare s"),
    ("prepare_gb", "prepare host GB"),
    ("train_step_ms", "train step ms"),
    ("epoch_s", "epoch s (extrapolated)"),
    ("train_gb", "train host GB"),
    ("eval_s", "eval all users s"),
    ("eval_gb", "eval host GB"),
    ("eval_gpu_gb", "eval GPU GB"),
]


def flatten(n: int, rec: dict) -> dict:
    row = {"interactions": n, **shape(n)}
    if "prepare" in rec:
        row.update(prepare_s=rec["prepare"]["s"], prepare_gb=rec["prepare"]["peak_host_gb"])
    if "train" in rec and "failed" not in rec["train"]:
        t = rec["train"]
        row.update(train_step_ms=t["step_s"] * 1e3, epoch_s=t["epoch_s_extrapolated"], train_gb=t["peak_host_gb"], train_gpu_gb=t.get("peak_gpu_gb"))
        if "step_parts_ms" in t:
            row["step_parts_ms"] = t["step_parts_ms"]
    if rec.get("eval") and "s" in rec["eval"] and "failed" not in rec["eval"]:
        e = rec["eval"]
        row.update(eval_s=e["s"], eval_gb=e["peak_host_gb"], eval_gpu_gb=e.get("peak_gpu_gb"))
    return row


def markdown(payload: dict) -> list[str]:
    rows, dev = payload["rows"], payload["info"]["device"]
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = [
        f"# Scale: {dev.get('gpu') or 'CPU'} ({dev['cpu_count']} cores, {dev['platform']})",
        "",
        f"commit {payload['info'].get('commit', '?')}; {payload['settings']}",
        "",
        "| interactions | users | items | " + " | ".join(h for _, h in cols) + " |",
        "|---:|---:|---:|" + "---:|" * len(cols),
    ]
    fmt = lambda v: "not run" if v is None else (f"{v:,.1f}" if v >= 10 else f"{v:.2f}")  # noqa: E731
    for r in rows:
        lines.append(f"| {r['interactions']:.0e} | {r['users']:,} | {r['items']:,} | " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |")
    slopes = ", ".join(f"{h} {v:.2f}" for k, h in cols if (v := payload["exponents"].get(k)) is not None)
    lines += ["", f"Growth exponents (slope of log cost on log interactions): {slopes}"]
    parts = [(r["interactions"], r["step_parts_ms"]) for r in rows if r.get("step_parts_ms")]
    if parts:
        lines += ["", "Training step, each part synchronised (ms): " + "; ".join(
            f"{n:.0e}: batch {p['batch']:.1f}, forward + backward {p['forward_backward']:.1f}, optimizer {p['optimizer']:.1f}" for n, p in parts
        )]  # fmt: skip
    notes = payload.get("notes", [])
    return lines + ([""] + [f"- {x}" for x in notes] if notes else [])


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k, label in (("prepare_s", "prepare"), ("epoch_s", "train epoch (extrapolated)"), ("eval_s", "evaluate all users")):
        pts = [(r["interactions"], r[k]) for r in rows if r.get(k)]
        if pts:
            a.plot(*zip(*pts), marker="o", label=label)
    for k, label in (("prepare_gb", "prepare"), ("train_gb", "train"), ("eval_gb", "evaluate")):
        pts = [(r["interactions"], r[k]) for r in rows if r.get(k)]
        if pts:
            b.plot(*zip(*pts), marker="o", label=label)
    for ax, ylab in ((a, "seconds"), (b, "peak host memory, GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Cost against log size ({payload['info']['device'].get('gpu') or 'CPU'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from fuxi_mme.utils.runinfo import run_info
    from fuxi_mme.utils.runtime import setup_device

    if args.quick:
        args.dim, args.max_len, args.steps, args.warmup = 16, 50, min(args.steps, 3), 1
    info = run_info(setup_device(args.device, tf32=args.tf32 == "on"))  # the device record names the workers' TF32 setting
    phases = args.phases.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    on_cpu = not info["device"].get("gpu") or args.device == "cpu"
    records, notes = {}, []
    out = Path(args.out) if args.out else RESULTS / f"scale-{card(info)}.json"
    md = out.with_suffix(".md")

    def record() -> None:
        """Save what is measured so far (after every phase: a long run that is cut off keeps it)."""
        rows = [flatten(int(float(k)), r) for k, r in records.items()]
        payload = {
            "info": info,
            "settings": f"{args.model} d {args.dim}, max_len {args.max_len}, batch {args.batch_size}, "
            f"{args.steps} timed steps, TF32 {args.tf32}, duplicates {args.duplicates}, evaluation batch {args.eval_batch} users, "
            f"ranking {_rankings(records)}",
            "records": records,
            "rows": rows,
            "exponents": {k: e for k, _ in COLUMNS if (e := exponents(rows, k)) is not None},
            "notes": notes
            + [f"{k}: {ph} failed ({r[ph]['failed']})" for k, r in records.items() for ph in ("train", "eval") if "failed" in (r.get(ph) or {})]
            + ["train epoch s is extrapolated: measured step time x steps per epoch"],
        }
        save(out, payload, markdown(payload))
        plot(payload, out.with_suffix(".png"))

    for n in sorted(int(float(s)) for s in args.sizes.split(",")):
        rec: dict = {"generate": generate(n, work / f"log-{n:.0e}")}
        records[f"{n:.0e}"] = rec
        print(f"{n:.0e}: generated in {rec['generate']['generate_s']:.1f} s", flush=True)
        if "prepare" in phases:
            rec["prepare"] = run_prepare(n, work, args.duplicates)
            print(f"{n:.0e}: prepared in {rec['prepare']['s']:.1f} s, peak {rec['prepare']['peak_host_gb']:.2f} GB", flush=True)
            record()
        if "train" in phases:
            rec["train"] = run_worker("train", n, args)
            t = rec["train"]
            said = f"train {t['failed']}" if "failed" in t else f"step {t['step_s'] * 1e3:.1f} ms, peak {t['peak_host_gb']:.2f} GB"
            print(f"{n:.0e}: {said}", flush=True)
            record()
        if "eval" in phases:
            if on_cpu and n > args.cpu_eval_max:
                rec["eval"] = None
                notes.append(f"{n:.0e}: full-ranking evaluation of every user not run on the CPU (--cpu-eval-max {args.cpu_eval_max:.0e})")
            else:
                rec["eval"] = e = run_worker("eval", n, args)
                said = f"eval {e['failed']}" if "failed" in e else f"evaluated {e['eval_users']:,} users in {e['s']:.1f} s"
                print(f"{n:.0e}: {said}", flush=True)
        record()
        if not args.keep:
            shutil.rmtree(work / f"log-{n:.0e}", ignore_errors=True)
            for d in (work / "data" / "prepared").glob(f"scale-{n:.0e}-*"):
                shutil.rmtree(d, ignore_errors=True)
    print(md.read_text())


if __name__ == "__main__":
    main()
