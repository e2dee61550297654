"""What the beyond-accuracy metrics add to one full evaluation pass (docs/training.md#beyond-accuracy-metrics):
``evaluate_split`` on one split with ``beyond`` off and on, the passes alternating, each
synchronised, the first of each (warm-up: kernels, item features, popularity) left out; medians
and their ratio. The target: under 10% on ML-1M-ts70 on the GPU.

The model is the preset's, freshly initialised (the time does not depend on the weights), run
at the preset's evaluation precision. One-time setup (reading the item features, the training
popularity), which an evaluation every epoch pays once per run, is timed apart.

    PYTHONPATH=src python benchmarks/eval_overhead.py --data-root ../shared/data            # ML-1M-ts70, GPU
    PYTHONPATH=src python benchmarks/eval_overhead.py --quick --device cpu                  # demo data, seconds

Appends a record to ``benchmarks/results/eval-overhead-<card>.json`` and rewrites the Markdown
table next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402

TARGET = 0.10  # the bound on the added share of an evaluation pass


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ml-1m-ts70-fuxi-mme-base")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="the folder holding ml-1m/ (the layout of ../shared/data)")
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    ap.add_argument("--repeats", type=int, default=7, help="timed passes of each kind (after one warm-up each)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="the demo data (300 users), 2 passes each: a CPU smoke run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--out", help="results file (default benchmarks/results/eval-overhead-<card>.json)")
    return ap.parse_args(argv)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _markdown(runs: list[dict]) -> list[str]:
    lines = [
        "# Beyond-accuracy metrics: added time of one evaluation pass",
        "",
        "`benchmarks/eval_overhead.py`: `evaluate_split` on one split, beyond-accuracy metrics off and on (alternating passes, "
        "synchronised, warm-up left out), medians; the preset's model freshly initialised, history as eval.history resolves it. "
        f"Target: under {TARGET:.0%} added. Setup: item features and training popularity, read once per run.",
        "",
        "| time | commit | device | torch | preset | split | users / items | K | off s | on s | added | setup s | ILD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        d = r["device"]
        lines.append(
            f"| {r['time']} | `{str(r['commit'])[:10]}` | {d.get('gpu') or d.get('device')} | {r['versions'].get('torch', '-')} "
            f"| {r['preset']}{''.join(' ' + o for o in r['overrides'])} | {r['split']} | {r['users']:,} / {r['items']:,} | "
            f"{','.join(map(str, r['ks']))} | {r['off_s']:.4f} | {r['on_s']:.4f} | {r['added']:+.1%} | {r['setup_s']:.3f} | "
            f"{'yes' if r['ild'] else 'no'} |"
        )
    return lines


def measure(args: argparse.Namespace) -> dict:
    """The record of one benchmark run (nothing written)."""
    from fuxi_mme.config import apply_overrides
    from fuxi_mme.data import load_dataset
    from fuxi_mme.data.features import item_features
    from fuxi_mme.data.splits import eval_arrays, split_points
    from fuxi_mme.eval.beyond import popularity
    from fuxi_mme.eval.evaluator import evaluate_split, model_scorer, resolve_history
    from fuxi_mme.experiments.plan import DATA_FOLDERS
    from fuxi_mme.models import build_model
    from fuxi_mme.presets import build_preset
    from fuxi_mme.utils.runtime import autocast_dtype, train_device

    preset = "demo-fuxi-mme-base" if args.quick else args.preset
    cfg = build_preset(preset)
    over = list(args.overrides)
    if args.quick:
        over = ["data.demo_users=300", "data.max_len=50", *over]
    folder = DATA_FOLDERS.get(cfg.data.name)
    if folder and not args.quick:
        path = Path(args.data_root) / folder
        if not path.exists():
            raise SystemExit(f"{path} is absent: pass --data-root (the folder holding {folder}/) or --quick")
        over = [f"data.path={path}", *over]
    apply_overrides(cfg, [*over, f"train.device={args.device}"])
    dev = train_device(cfg.train)  # as `fuxi-mme train` sets it up (TF32)
    ds = load_dataset(cfg.data)
    arrs = eval_arrays(ds, cfg.data.protocol, args.split, cfg.data.max_len)
    history, _ = resolve_history(cfg.eval.history, ds, cfg.data.protocol)
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(dev).eval()
    amp = autocast_dtype(cfg.train.amp) if dev.type == "cuda" else None
    scorer = model_scorer(model, amp)

    t0 = time.perf_counter()
    feats, _ = item_features(ds)
    popularity(ds, split_points(ds, cfg.data.protocol)["train_end"])
    setup_s = time.perf_counter() - t0

    def one(beyond: bool) -> tuple[float, dict]:
        _sync(dev)
        t = time.perf_counter()
        m = evaluate_split(
            scorer, arrs, ds, split=args.split, history=history, ks=cfg.eval.ks, batch_size=cfg.eval.batch_size,
            device=dev, protocol=cfg.data.protocol, beyond=beyond,
        )  # fmt: skip
        _sync(dev)
        return time.perf_counter() - t, m

    repeats = 2 if args.quick else args.repeats
    one(False), one(True)  # warm-up
    off, on, last = [], [], {}
    for _ in range(repeats):
        off.append(one(False)[0])
        s, last = one(True)
        on.append(s)
    info = run_info(dev)
    off_s, on_s = statistics.median(off), statistics.median(on)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": info["commit"],
        "device": info["device"],
        "versions": info["versions"],
        "preset": preset,
        "overrides": over if args.quick else args.overrides,
        "split": args.split,
        "users": len(arrs),
        "items": ds.num_items,
        "ks": list(cfg.eval.ks),
        "batch_size": cfg.eval.batch_size,
        "history": history,
        "amp": str(amp) if amp else None,
        "repeats": repeats,
        "off_s_all": off,
        "on_s_all": on,
        "off_s": off_s,
        "on_s": on_s,
        "added": on_s / off_s - 1,
        "setup_s": setup_s,
        "ild": feats is not None,
        "beyond": last.get("beyond", {}),
        "NDCG@10": last.get("NDCG@10"),
    }


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    record = measure(args)
    shown = ("preset", "users", "items", "off_s", "on_s", "added", "setup_s")
    print(json.dumps({k: record[k] for k in shown}), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"eval-overhead-{card(record)}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    runs = [*old.get("runs", []), record]
    print(save(out, {"benchmark": "eval_overhead", "runs": runs}, _markdown(runs)))
    return record


if __name__ == "__main__":
    main()
