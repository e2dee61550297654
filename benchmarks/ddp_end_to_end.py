"""End-to-end multi-GPU check on real data: the same `fuxi-mme train` on 1 and on N GPUs.

Trains a preset (default ml-1m-ts70-fuxi-mme-base, bf16) for a fixed number of epochs with
one process and with ``torchrun --nproc_per_node=N``, records wall time, mean epoch time and
test metrics of both, then evaluates the N-GPU run's best checkpoint in one process and checks
that the metrics equal the distributed evaluation's.

    PYTHONPATH=src python benchmarks/ddp_end_to_end.py --source ../shared/data/ml-1m --nproc 2

Writes ``benchmarks/results/ddp-e2e-<preset>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _run(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def _summary(run: Path, wall: float) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ep = [r["epoch_seconds"] for r in recs if r["kind"] == "train"]
    return {
        "wall_s": wall,
        "epochs": len(ep),
        "epoch_s_mean": sum(ep) / len(ep),
        "seq_per_s_mean": sum(r["seq_per_s"] for r in recs if r["kind"] == "train") / len(ep),
        "selected_epoch": m["selected_epoch"],
        "test": m["test"],
        "valid_best": m.get("valid_best"),
    }


def _train_both(args, common: list[str], tmp: Path) -> tuple[dict, dict]:
    """Train in one process and under torchrun; each run's summary, and the one-process
    evaluation of the distributed run's best checkpoint."""
    one, many = tmp / "one", tmp / "many"
    w1 = _run([sys.executable, "-m", "fuxi_mme", *common, "--run-dir", str(one)])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    wn = _run([*torchrun, "-m", "fuxi_mme", *common, "--run-dir", str(many)])
    res = {"1": _summary(one, w1), str(args.nproc): _summary(many, wn)}
    p = subprocess.run(
        [sys.executable, "-m", "fuxi_mme", "evaluate", "--run", str(many), "--checkpoint", "best", "--json"],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        capture_output=True,
        text=True,
        check=True,
    )
    return res, json.loads(p.stdout[p.stdout.index("{") :])["test"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ml-1m-ts70-fuxi-mme-base")
    ap.add_argument("--source", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--amp", default="bf16")
    ap.add_argument("--out")
    args = ap.parse_args()
    from fuxi_mme.utils.runinfo import atomic_write_json, atomic_write_text, run_info
    from fuxi_mme.utils.runtime import resolve_device

    info = run_info(resolve_device("auto"))
    card = (info["device"].get("gpu") or "cpu").replace(" ", "_")
    common = ["train", "--preset", args.preset, "--source", args.source, "--amp", args.amp, "--epochs", str(args.epochs), "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        res, single_eval = _train_both(args, common, Path(tmp))
    equal = single_eval == res[str(args.nproc)]["test"]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ddp-e2e-{args.preset}-{card}")
    payload = {
        "benchmark": "ddp_end_to_end",
        "preset": args.preset,
        "amp": args.amp,
        "epochs": args.epochs,
        **info,
        "results": res,
        "single_process_eval_of_distributed_checkpoint": single_eval,
        "distributed_eval_equals_single": equal,
    }
    atomic_write_json(out.with_suffix(".json"), payload)
    md = [
        f"# {args.preset}: 1 vs {args.nproc} GPUs ({card}), {args.epochs} epochs, amp={args.amp}, commit {info['commit']}",
        "",
        "| GPUs | wall s (incl. start-up, data, eval) | mean epoch s | train seq/s | selected epoch | test NDCG@10 | test HR@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in res.items():
        md.append(
            f"| {k} | {r['wall_s']:.1f} | {r['epoch_s_mean']:.2f} | {r['seq_per_s_mean']:,.0f} | {r['selected_epoch']} "
            f"| {r['test']['NDCG@10']:.4f} | {r['test']['HR@10']:.4f} |"
        )
    md += ["", f"One-process evaluation of the {args.nproc}-GPU run's best checkpoint equals its distributed evaluation: **{equal}**"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
