"""Bounded soak of `fuxi-mme serve` on 127.0.0.1: a mix of valid and bad requests, then SIGTERM.

Starts the service for a trained run (by default a tiny demo run trained here first) in a
subprocess, then ``--clients`` threads, each with its own keep-alive connection, send requests
for ``--seconds`` seconds: valid single and batch recommendations, and bad ones (malformed
JSON, wrong types, invalid values, unknown items under ``reject``, an over-limit body, an
unknown route), each with the status it must get. At the end of that time the server gets
SIGTERM while the clients keep sending. Recorded: responses and req/s before SIGTERM, p50/p99
latency (valid requests), counts of 2xx/4xx/5xx and of answers other than the expected one,
the server's peak RSS (``VmHWM``) and its RSS after start-up and before SIGTERM, the time from
SIGTERM to exit, the exit code, and whether the requests in flight at SIGTERM were answered.

    python benchmarks/serve_soak.py --seconds 30 --clients 8

Writes ``benchmarks/results/serve-soak-<card>.json`` and ``.md``. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, card, save
from serve_load import free_port, wait_health

MAX_BODY_KB = 64  # the server's --max-body-kb here, so an over-limit body stays cheap to send
INVALID = [b'{"history": []}', b'{"history": [1], "k": 0}', b'{"history": [1, 2], "timestamps": [5, 1]}']  # each a 422
SIGTERM_CODE = " (uvicorn re-raises SIGTERM once its graceful shutdown is done)"


@dataclass
class Sent:
    kind: str
    expect: int
    t0: float
    t1: float = 0.0
    status: int | None = None  # None: no answer (connection refused, reset or timed out)


def train_tiny_run(folder: Path) -> Path:
    """A small demo run, trained in this process (a few seconds on a CPU)."""
    sys.path.insert(0, str(ROOT / "src"))
    from fuxi_mme.config import apply_overrides
    from fuxi_mme.presets import build_preset, preset_name
    from fuxi_mme.train.run import train

    cfg = build_preset(preset_name("demo", "fuxi-mme", "base"))
    over = {
        "data.demo_users": 300,
        "data.max_len": 30,
        "model.dim": 32,
        "model.qk_dim": 16,
        "model.v_dim": 16,
        "model.num_heads": 2,
        "model.ffn_dim": 32,
        "train.epochs": 2,
        "train.device": "cpu",
        "log.progress": False,
        "log.run_dir": str(folder / "run"),
        "data.data_dir": str(folder / "cache"),
    }
    apply_overrides(cfg, [f"{k}={v}" for k, v in over.items()])
    train(cfg)
    return folder / "run"


def request_mix(histories: list[list], timestamps: list[list | None], rng: random.Random):
    """(weight, kind, method, path, body, expected status) of each kind of request."""

    def one() -> dict:
        i = rng.randrange(len(histories))
        return {"history": histories[i], "timestamps": timestamps[i], "k": 10}

    return [
        (55, "valid", "POST", "/recommend", lambda: json.dumps(one()).encode(), 200),
        (8, "valid-batch", "POST", "/recommend/batch", lambda: json.dumps({"requests": [one() for _ in range(16)]}).encode(), 200),
        (4, "health", "GET", "/health", lambda: None, 200),
        (7, "malformed-json", "POST", "/recommend", lambda: b'{"history": [1, 2,', 400),
        (7, "wrong-types", "POST", "/recommend", lambda: b'{"history": "abc", "k": "ten"}', 422),
        (7, "invalid-values", "POST", "/recommend", lambda: rng.choice(INVALID), 422),
        (5, "unknown-items", "POST", "/recommend", lambda: b'{"history": ["no-such-item"], "unknown_items": "reject"}', 422),
        (4, "over-limit", "POST", "/recommend", lambda: b'{"history": [' + b"1," * (MAX_BODY_KB * 600) + b"1]}", 413),
        (3, "unknown-route", "GET", "/nope", lambda: None, 404),
    ]


def client(port: int, mix, stop_sending: threading.Event, give_up: float, out: list[Sent], seed: int) -> None:
    rng = random.Random(seed)
    weights = [m[0] for m in mix]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    refused = 0
    while time.perf_counter() < give_up and refused < 3:
        _, kind, method, path, body, expect = rng.choices(mix, weights)[0]
        s = Sent(kind, expect, time.perf_counter())
        try:
            conn.request(method, path, body=body(), headers={"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            s.status = r.status
            if r.getheader("connection", "").lower() == "close":
                conn.close()
            refused = 0
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            refused += stop_sending.is_set()  # after SIGTERM, three failures in a row: the server is gone
        s.t1 = time.perf_counter()
        out.append(s)


def rss_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def summarize(sent: list[Sent], t_start: float, t_sig: float) -> dict:
    before = [s for s in sent if s.t1 <= t_sig]
    answered = [s for s in before if s.status is not None]
    ok_ms = np.array([(s.t1 - s.t0) * 1e3 for s in answered if s.kind == "valid" and s.status == 200])
    in_flight = [s for s in sent if s.t0 < t_sig < s.t1]
    after = [s for s in sent if s.t0 >= t_sig]
    by_kind = {}
    for s in answered:
        k = by_kind.setdefault(s.kind, {"sent": 0, "expected": 0})
        k["sent"] += 1
        k["expected"] += s.status == s.expect
    return {
        "responses_before_sigterm": len(answered),
        "no_answer_before_sigterm": len(before) - len(answered),
        "req_per_s": len(answered) / (t_sig - t_start),
        "valid_p50_ms": float(np.percentile(ok_ms, 50)) if len(ok_ms) else None,
        "valid_p99_ms": float(np.percentile(ok_ms, 99)) if len(ok_ms) else None,
        "status_2xx": sum(200 <= (s.status or 0) < 300 for s in answered),
        "status_4xx": sum(400 <= (s.status or 0) < 500 for s in answered),
        "status_5xx": sum((s.status or 0) >= 500 for s in answered),
        "unexpected_status": sum(s.status != s.expect for s in answered),
        "by_kind": by_kind,
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_answered": sum(s.status is not None for s in in_flight),
        "in_flight_answered_as_expected": sum(s.status == s.expect for s in in_flight),
        "sent_after_sigterm": len(after),
        "answered_after_sigterm": sum(s.status is not None for s in after),
    }


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run directory (default: train a tiny demo run first)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="load before SIGTERM")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds the clients keep sending after SIGTERM at most")
    ap.add_argument("--name", default=None)
    return ap.parse_args()


def soak(run: Path, mix: list, args: argparse.Namespace) -> dict:
    """Start ``fuxi-mme serve`` on the run, load it from ``args.clients`` threads for
    ``args.seconds``, send SIGTERM under load and summarise what the clients saw."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "fuxi_mme", "serve", "--run", str(run), "--port", str(port), "--device", "cpu", "--max-body-kb", str(MAX_BODY_KB)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_health(port, proc)
        rss_start = rss_kb(proc.pid)
        sent: list[list[Sent]] = [[] for _ in range(args.clients)]
        stop_sending = threading.Event()
        t_start = time.perf_counter()
        give_up = t_start + args.seconds + args.grace
        threads = [threading.Thread(target=client, args=(port, mix, stop_sending, give_up, sent[i], i)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        rss_end = rss_kb(proc.pid)
        t_sig = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        stop_sending.set()
        code = proc.wait(timeout=120)
        t_exit = time.perf_counter()
        for t in threads:
            t.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read() if proc.stderr else ""
    all_sent = [s for part in sent for s in part]
    res = summarize(all_sent, t_start, t_sig)
    res.update(
        seconds_to_exit_after_sigterm=t_exit - t_sig,
        exit_code=code,
        server_traceback="Traceback" in stderr,
        rss_after_startup_mb=rss_start["VmRSS"] / 1024,
        rss_before_sigterm_mb=rss_end["VmRSS"] / 1024,
        peak_rss_mb=rss_end["VmHWM"] / 1024,
    )
    return res


def _markdown(rec, info: dict, params: int, args: argparse.Namespace, r: dict) -> list[str]:
    return [
        f"# Serving soak: {rec.cfg.model.name} on {rec.ds.name} ({rec.num_items:,} items, {params:,} parameters), CPU",
        "",
        f"{info['device']['platform']}, {info['device']['cpu_count']} cores shared by server and clients, torch {info['versions'].get('torch')}, "
        f"commit {info['commit']}. {args.clients} clients for {args.seconds:.0f} s, then SIGTERM under load.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| responses before SIGTERM | {r['responses_before_sigterm']:,} ({r['req_per_s']:,.0f} req/s) |",
        f"| valid `/recommend` latency p50 / p99 | {r['valid_p50_ms']:.1f} / {r['valid_p99_ms']:.1f} ms |",
        f"| 2xx / 4xx / 5xx | {r['status_2xx']:,} / {r['status_4xx']:,} / {r['status_5xx']:,} |",
        f"| answers other than the expected status | {r['unexpected_status']} |",
        f"| requests without an answer before SIGTERM | {r['no_answer_before_sigterm']} |",
        f"| RSS after start-up / before SIGTERM / peak | {r['rss_after_startup_mb']:.0f} / {r['rss_before_sigterm_mb']:.0f} / "
        f"{r['peak_rss_mb']:.0f} MB |",
        f"| in flight at SIGTERM / answered (as expected) | {r['in_flight_at_sigterm']} / {r['in_flight_answered']} "
        f"({r['in_flight_answered_as_expected']}) |",
        f"| sent after SIGTERM / answered | {r['sent_after_sigterm']} / {r['answered_after_sigterm']} |",
        f"| exit after SIGTERM | {r['seconds_to_exit_after_sigterm']:.2f} s, code {r['exit_code']}{SIGTERM_CODE if r['exit_code'] == -15 else ''}, "
        f"traceback: {'yes' if r['server_traceback'] else 'no'} |",
    ]


def main() -> None:
    args = _parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from fuxi_mme.serve import Recommender
    from fuxi_mme.utils.runinfo import run_info

    tmp = tempfile.TemporaryDirectory(prefix="serve-soak-")
    run = Path(args.run) if args.run else train_tiny_run(Path(tmp.name))
    rec = Recommender.from_run(run, device="cpu")
    hist = [rec.history_of(u) for u in rec.ds.user_raw[:200]]
    histories = [q.history[-rec.max_len :] for q in hist]
    stamps = [q.timestamps[-rec.max_len :] if q.timestamps else None for q in hist]
    mix = request_mix(histories, stamps, random.Random(0))
    r = soak(run, mix, args)
    info = run_info(torch.device("cpu"))
    params = sum(p.numel() for p in rec.model.parameters())
    payload = {
        "benchmark": "serve_soak",
        **info,
        "run": str(run) if args.run else "tiny demo run trained by the script",
        "model": rec.cfg.model.name,
        "items": rec.num_items,
        "parameters": params,
        "clients": args.clients,
        "seconds": args.seconds,
        "max_body_kb": MAX_BODY_KB,
        "mix": {m[1]: {"weight": m[0], "expect": m[5]} for m in mix},
        "client_and_server_on_the_same_machine": True,
        "result": r,
    }
    out = RESULTS / (args.name or f"serve-soak-{card(info)}")
    md = _markdown(rec, info, params, args, r)
    print("\n".join(md[2:]))
    print(f"wrote {save(out, payload, md)}")
    tmp.cleanup()
    bad = r["status_5xx"] or r["unexpected_status"] or r["server_traceback"] or r["in_flight_answered"] < r["in_flight_at_sigterm"]
    if bad:
        raise SystemExit("the soak found failures (see the table)")


if __name__ == "__main__":
    main()
