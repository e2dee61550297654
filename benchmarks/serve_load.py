"""Load test of `fuxi-mme serve` on 127.0.0.1: throughput and latency percentiles.

Starts the service for a trained run in a subprocess (127.0.0.1, a free port), waits for
``/health``, then sends a bounded number of requests from ``--concurrency`` client threads
(each with its own keep-alive connection), in two phases:

* ``single``: ``POST /recommend`` with one user's history;
* ``batch``: ``POST /recommend/batch`` with ``--batch-size`` histories.

Histories are real users' histories from the run's dataset (their most recent items, as a
deployed service would see them). Latency is measured per request on the client, from
sending to the parsed response. Any non-200 answer, timeout or connection error counts as an
error; the run fails if there is one.

    PYTHONPATH=src python benchmarks/serve_load.py --run runs/ml1m --requests 2000 --concurrency 8

Writes ``benchmarks/results/serve-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("the server did not become healthy in time")


def phase(port: int, bodies: list[bytes], path: str, concurrency: int, time_limit: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + time_limit
    chunks = [bodies[i::concurrency] for i in range(concurrency)]

    def client(mine: list[bytes]):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out, errs = [], []
        for b in mine:
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=b, headers={"content-type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    errs.append(f"HTTP {r.status}: {data[:200]!r}")
                else:
                    json.loads(data)
                    out.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errs.append(repr(exc))
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()
        return out, errs

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for out, errs in pool.map(client, chunks):
            lat += out
            errors += errs
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {
        "requests": len(lat) + len(errors),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": wall,
        "req_per_s": len(lat) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "mean_ms": float(ms.mean()) if len(ms) else None,
    }


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--requests", type=int, default=2000, help="single-query requests")
    ap.add_argument("--batch-requests", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase at most")
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--name", default=None)
    return ap.parse_args()


def _bodies(rec, args: argparse.Namespace) -> tuple[list[bytes], list[bytes]]:
    """Request bodies of random dataset users' histories: single queries and batches."""
    rng = random.Random(0)
    users = list(range(rec.ds.num_users))

    def body() -> dict:
        q = rec.history_of(rec.ds.user_raw[rng.choice(users)])
        h = q.history[-rec.max_len :]
        t = q.timestamps[-rec.max_len :] if q.timestamps else None
        return {"history": h, "timestamps": t, "k": args.k}

    singles = [json.dumps(body()).encode() for _ in range(args.requests)]
    batches = [json.dumps({"requests": [body() for _ in range(args.batch_size)]}).encode() for _ in range(args.batch_requests)]
    return singles, batches


def _load(args: argparse.Namespace, singles: list[bytes], batches: list[bytes]) -> tuple[dict, dict, dict]:
    """Start ``fuxi-mme serve`` on the run and time both phases; the server's ``/model`` after them."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "fuxi_mme", "serve", "--run", args.run, "--port", str(port), "--device", "cpu"]
    cmd += ["--max-wait-ms", str(args.max_wait_ms)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_health(port, proc)
        phase(port, singles[:20], "/recommend", 2, 30)  # warm-up
        single = phase(port, singles, "/recommend", args.concurrency, args.time_limit)
        batch = phase(port, batches, "/recommend/batch", args.concurrency, args.time_limit)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/model")
        model = json.loads(c.getresponse().read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    batch["queries_per_s"] = batch["req_per_s"] * args.batch_size
    return single, batch, model


def _markdown(args, info: dict, model: dict, params: int, hist_len: float, single: dict, batch: dict) -> list[str]:
    return [
        f"# Serving load test: {model['model']} on {model['dataset']} ({model['items']:,} items, {params:,} parameters), CPU",
        "",
        f"{info['device']['platform']}, {info['device']['cpu_count']} cores shared by server and client, torch {info['versions'].get('torch')}, "
        f"commit {info['commit']}. "
        f"{args.concurrency} client connections, k={args.k}, mean history {hist_len:.0f} items, micro-batch window {args.max_wait_ms} ms.",
        "",
        "| phase | requests | errors | throughput | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| single (`/recommend`) | {single['requests']:,} | {single['errors']} | {single['req_per_s']:,.0f} req/s "
        f"| {single['p50_ms']:.1f} | {single['p95_ms']:.1f} | {single['p99_ms']:.1f} |",
        f"| batch of {args.batch_size} (`/recommend/batch`) | {batch['requests']:,} | {batch['errors']} "
        f"| {batch['req_per_s']:,.1f} req/s = {batch['queries_per_s']:,.0f} users/s "
        f"| {batch['p50_ms']:.1f} | {batch['p95_ms']:.1f} | {batch['p99_ms']:.1f} |",
        "",
        f"Server-side micro-batches: {model['micro_batches']:,} for {model['queries_served']:,} queries.",
    ]


def main() -> None:
    args = _parse_args()

    import torch

    from fuxi_mme.serve import Recommender
    from fuxi_mme.utils.runinfo import atomic_write_json, atomic_write_text, run_info

    rec = Recommender.from_run(args.run, device="cpu")
    singles, batches = _bodies(rec, args)
    hist_len = statistics.mean(len(json.loads(b)["history"]) for b in singles[:500])
    single, batch, model = _load(args, singles, batches)
    info = run_info(torch.device("cpu"))
    name = args.name or f"serve-{model['dataset']}-{model['model']}-cpu"
    params = sum(p.numel() for p in rec.model.parameters())
    payload = {
        "benchmark": "serve_load",
        **info,
        "run": args.run,
        "model": model,
        "parameters": params,
        "concurrency": args.concurrency,
        "k": args.k,
        "mean_history_len": hist_len,
        "batch_size": args.batch_size,
        "max_wait_ms": args.max_wait_ms,
        "client_and_server_on_the_same_machine": True,
        "single": single,
        "batch": batch,
    }
    out = ROOT / "benchmarks" / "results" / name
    atomic_write_json(out.with_suffix(".json"), payload)
    md = _markdown(args, info, model, params, hist_len, single, batch)
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    if single["errors"] or batch["errors"]:
        raise SystemExit(f"errors: {single['error_examples'] + batch['error_examples']}")


if __name__ == "__main__":
    main()
