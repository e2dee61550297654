"""Full-ranking evaluation time of one split, with the rows in length-sorted batches (what the
library does) against batches in user order (what it did before: each batch padded to its
longest sequence, so short histories were scored at a long one's width); and, on a CPU, the
length-sorted batches with the model run in chunks of ``FORWARD_TOKENS_CPU`` padded positions
(what the library does there) against one forward pass per batch.

The model is the preset's, freshly initialised (the time does not depend on the weights); the
ranks of both orders are compared (floating-point sums over a different padding width can move a
target past a near-tied item: the count of such rows and both NDCG@10 are recorded). Both orders run the same ``evaluate_ranks``: the user
order passes one batch of consecutive rows at a time, which it cannot reorder across batches.

    PYTHONPATH=src python benchmarks/eval_speed.py --preset amazon-beauty-fuxi-mme-base --data-path ../shared/data/amazon_s3rec

Appends a record to ``benchmarks/results/eval-<card>.json`` and rewrites the Markdown table next
to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402
from fuxi_mme.utils.runinfo import run_info  # noqa: E402


def timed(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="amazon-beauty-fuxi-mme-base")
    ap.add_argument("--data-path", help="the dataset's folder (the layout of ../shared/data)")
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--out", help="results file (default benchmarks/results/eval-<card>.json)")
    return ap.parse_args()


def _markdown(runs: list[dict]) -> list[str]:
    lines = [
        "# Full-ranking evaluation time, length-sorted batches against user order",
        "",
        "`benchmarks/eval_speed.py`: one split of a preset's data, the preset's model freshly initialised, history filtered. "
        "Rows ranked differently: targets that a last-bit difference in the scores (another padding width) moved past a near-tied item.",
        "",
        "On a CPU, length-sorted s is with the model run in forward chunks (`FORWARD_TOKENS_CPU` padded positions), "
        "and one pass s runs each batch's rows through the model at once (before the chunks; "
        "'-' in runs made before they were measured).",
        "",
        "| time | commit | device | threads | preset | split | users | mean length / max | length-sorted s | user order s | speed-up "
        "| rows ranked differently (largest change) | NDCG@10 sorted / user order | CPU: one pass s (chunks' speed-up; rows ranked differently) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        d = r["device"]
        lines.append(
            f"| {r['time']} | `{str(r['commit'])[:10]}` | {d.get('gpu') or d.get('device')} | {d.get('torch_threads', '-')} "
            f"| {r['preset']}{''.join(' ' + o for o in r['overrides'])} | "
            f"{r['split']} | {r['users']:,} | {r['mean_length']:.1f} / {r['max_len']} | {r['length_sorted_s']:.2f} | {r['user_order_s']:.2f} | "
            f"{r['user_order_s'] / r['length_sorted_s']:.1f}x | {r['rows_ranked_differently']} ({r['largest_rank_change']}) | "
            f"{r['ndcg10_length_sorted']:.5f} / {r['ndcg10_user_order']:.5f} | {_one_pass(r)} |"
        )
    return lines


def _one_pass(r: dict) -> str:
    if r.get("one_pass_s") is None:
        return "-"
    return f"{r['one_pass_s']:.2f} ({r['one_pass_s'] / r['length_sorted_s']:.1f}x; {r['one_pass_rows_ranked_differently']})"


def main() -> None:
    from fuxi_mme.config import apply_overrides
    from fuxi_mme.data import load_dataset
    from fuxi_mme.data.splits import eval_arrays
    from fuxi_mme.eval import evaluator
    from fuxi_mme.eval.evaluator import evaluate_ranks, model_scorer
    from fuxi_mme.eval.metrics import metrics_from_ranks
    from fuxi_mme.models import build_model
    from fuxi_mme.presets import build_preset
    from fuxi_mme.utils.runtime import train_device

    args = _parse_args()
    cfg = build_preset(args.preset)
    apply_overrides(cfg, [*([f"data.path={args.data_path}"] if args.data_path else []), f"train.device={args.device}", *args.overrides])
    dev = train_device(cfg.train)  # as `fuxi-mme train` sets it up (TF32)
    ds = load_dataset(cfg.data)
    arrs = eval_arrays(ds, cfg.data.protocol, args.split, cfg.data.max_len)
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(dev).eval()
    scorer = model_scorer(model)
    bs = cfg.eval.batch_size
    evaluate_ranks(scorer, arrs, ds, "mask", bs, dev, rows=np.arange(min(bs, len(arrs))))  # warm-up

    def user_order() -> np.ndarray:
        return np.concatenate(
            [evaluate_ranks(scorer, arrs, ds, "mask", bs, dev, rows=np.arange(s, min(s + bs, len(arrs)))) for s in range(0, len(arrs), bs)]
        )

    sorted_s, ranks = timed(lambda: evaluate_ranks(scorer, arrs, ds, "mask", bs, dev))
    chunk_tokens = evaluator.FORWARD_TOKENS_CPU
    evaluator.FORWARD_TOKENS_CPU = 1 << 62  # the baselines run each batch through the model in one pass, as before the chunks
    try:
        user_s, ranks_user = timed(user_order)
        one_pass_s, one_pass_differ = None, None
        if dev.type == "cpu":  # the same length-sorted batches, each through the model in one pass
            one_pass_s, ranks_one = timed(lambda: evaluate_ranks(scorer, arrs, ds, "mask", bs, dev))
            one_pass_differ = int((ranks_one != ranks).sum())
    finally:
        evaluator.FORWARD_TOKENS_CPU = chunk_tokens
    info = run_info(dev)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": info["commit"],
        "device": info["device"],
        "versions": info["versions"],
        "preset": args.preset,
        "split": args.split,
        "users": len(arrs),
        "items": ds.num_items,
        "batch_size": bs,
        "mean_length": float(arrs.lengths.mean()),
        "max_len": cfg.data.max_len,
        "overrides": args.overrides,
        "length_sorted_s": sorted_s,
        "user_order_s": user_s,
        "rows_ranked_differently": int((ranks != ranks_user).sum()),
        "largest_rank_change": int(np.abs(ranks - ranks_user).max()) if len(ranks) else 0,
        "ndcg10_length_sorted": metrics_from_ranks(ranks)["NDCG@10"],
        "ndcg10_user_order": metrics_from_ranks(ranks_user)["NDCG@10"],
        "one_pass_s": one_pass_s,
        "one_pass_rows_ranked_differently": one_pass_differ,
        "forward_tokens_cpu": evaluator.FORWARD_TOKENS_CPU if dev.type == "cpu" else None,
    }
    shown = ("preset", "users", "mean_length", "length_sorted_s", "user_order_s", "one_pass_s", "rows_ranked_differently", "largest_rank_change")
    print(json.dumps({k: record[k] for k in shown}), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"eval-{card(info)}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    runs = [*old.get("runs", []), record]
    print(save(out, {"benchmark": "eval_speed", "runs": runs}, _markdown(runs)))


if __name__ == "__main__":
    main()
