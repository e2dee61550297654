"""Ranking speed at large catalogues: the reference full ranking (each batch's users x items
scores written, history masked, targets compared: ``eval.ranking=scores``) against the fused
kernel that counts the items above each target without writing scores (``eval.ranking=fused``,
``eval/rank_kernel.py``; docs/performance.md#fused-ranking).

Synthetic user and item vectors (normal, the model's scoring width), random targets and 50
history items per user; the model's forward pass is not timed (it is the same for both). Both
take the same users; the reference in batches of ``score_batch`` users (at most 2^30 scores),
the fused kernel in batches of ``--users``. Agreement: the share of users whose rank is the same
(two products of the same vectors can round differently, so near-tied items can swap) and the
HR@10 of both.

    PYTHONPATH=src python benchmarks/rank_speed.py                   # GPU
    PYTHONPATH=src python benchmarks/rank_speed.py --items 1e4 --users 256 --device cpu   # smoke (interpreter)

Writes ``benchmarks/results/rank-speed-<card>.json`` and the Markdown table next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default="1e5,1e6,1e7", help="catalogue sizes, comma-separated")
    ap.add_argument("--width", type=int, default=50)
    ap.add_argument("--users", type=int, default=4096, help="users ranked per size")
    ap.add_argument("--history", type=int, default=50, help="history items per user (masked)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tf32", default="on", choices=("on", "off"), help="TF32 products (train.tf32: on, the default) or strict fp32 (off)")
    ap.add_argument("--out", help="results file (default benchmarks/results/rank-speed-<card>.json)")
    return ap.parse_args(argv)


def reference(u, v, tgt, hr, hi, batch: int) -> torch.Tensor:
    """The evaluator's ranking of written scores (``score_ranks``, eval.ranking=scores), batch by batch."""
    from fuxi_mme.eval.evaluator import score_ranks

    out = []
    for s in range(0, len(u), batch):
        sel = (hr >= s) & (hr < s + batch)
        out.append(score_ranks(u[s : s + batch] @ v.T, tgt[s : s + batch], (hr[sel] - s, hi[sel]))[0])
    return torch.cat(out)


def fused(u, v, tgt, hr, hi) -> torch.Tensor:
    from fuxi_mme.eval.rank_kernel import fused_ranks

    return fused_ranks(u, v, tgt, (hr, hi))[0]


def _time(fn, data: tuple, repeats: int, sync) -> tuple[float, torch.Tensor]:
    """Best of ``repeats`` calls of ``fn(*data)`` after one warm-up call."""
    out = fn(*data)  # warm-up: compilation, allocation
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*data)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    from fuxi_mme.eval.evaluator import score_batch
    from fuxi_mme.utils.runinfo import run_info
    from fuxi_mme.utils.runtime import setup_device

    dev = setup_device(args.device, tf32=args.tf32 == "on")  # on: the library's default (train.tf32)
    info = run_info(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for n in (int(float(x)) for x in args.items.split(",")):
        u = torch.randn(args.users, args.width, device=dev, generator=g)
        v = torch.randn(n + 1, args.width, device=dev, generator=g) / args.width**0.5
        # targets near the top of each user's ranking, as a trained model's often are
        tgt = torch.randint(1, n + 1, (args.users,), device=dev, generator=g)
        v[tgt] = u / u.norm(dim=1, keepdim=True) * 0.9 + v[tgt] * 0.1
        hr = torch.arange(args.users, device=dev).repeat_interleave(args.history)
        hi = torch.randint(1, n + 1, (args.users * args.history,), device=dev, generator=g)
        batch = score_batch(1024, n)
        ref_s, ref = _time(reference, (u, v, tgt, hr, hi, batch), args.repeats, sync)
        fus_s, got = _time(fused, (u, v, tgt, hr, hi), args.repeats, sync)
        same = (ref == got).float().mean().item()
        row = {
            "items": n,
            "users": args.users,
            "reference_s": ref_s,
            "fused_s": fus_s,
            "reference_users_per_s": args.users / ref_s,
            "fused_users_per_s": args.users / fus_s,
            "speedup": ref_s / fus_s,
            "same_rank": same,
            "hr10_reference": (ref <= 10).float().mean().item(),
            "hr10_fused": (got <= 10).float().mean().item(),
            "reference_batch": batch,
        }
        rows.append(row)
        print(row, flush=True)
    payload = {"info": info, "settings": vars(args), "rows": rows}
    lines = [
        f"# Ranking speed: reference against fused ({info['device'].get('gpu') or 'CPU'}, commit {info.get('commit', '?')})",
        "",
        f"`benchmarks/rank_speed.py`: {args.users} users, width {args.width}, {args.history} masked history items each, TF32 {args.tf32}; "
        f"best of {args.repeats}; the model's forward pass not timed.",
        "",
        "| items | reference s (users/s) | fused s (users/s) | speed-up | same rank | HR@10 reference / fused |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['items']:.0e} | {r['reference_s']:.3f} ({r['reference_users_per_s']:,.0f}) | {r['fused_s']:.3f} ({r['fused_users_per_s']:,.0f}) | "
            f"{r['speedup']:.1f}x | {r['same_rank']:.2%} | {r['hr10_reference']:.4f} / {r['hr10_fused']:.4f} |"
        )
    out = Path(args.out) if args.out else RESULTS / f"rank-speed-{card(info)}.json"
    print(save(out, payload, lines).read_text())


if __name__ == "__main__":
    main()
