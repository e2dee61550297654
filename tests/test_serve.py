"""Inference and serving: `recommend`, the HTTP service (every bad input is a 4xx with a
clear message), micro-batching and the demo page in headless Chromium (export: test_export.py)."""

import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import free_port, tiny_config
from fuxi_mme.cli import main
from fuxi_mme.serve import Query, Recommender
from fuxi_mme.train.run import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    import os

    os.environ["FUXI_MME_DATA"] = str(root / "cache")
    train(tiny_config("fuxi-mme", **{"train.epochs": 1, "log.run_dir": str(root / "run")}))
    return root / "run"


@pytest.fixture(scope="module")
def rec(run_dir):
    return Recommender.from_run(run_dir, device="cpu")


def _hist(rec, user=0, n=None):
    q = rec.history_of(rec.ds.user_raw[user])
    if n is not None:
        q.history, q.timestamps = q.history[:n], q.timestamps[:n]
    return q


def test_recommendations_exclude_seen_and_map_back_to_raw_ids(rec):
    q = _hist(rec, 3)
    res = rec.recommend([Query(q.history, q.timestamps, k=15, exclude_seen=True)])[0]
    got = [x["item"] for x in res["items"]]
    assert len(got) == 15 and not set(got) & set(q.history)
    assert all(isinstance(x["title"], str) and x["title"] for x in res["items"])  # demo items have titles
    scores = [x["score"] for x in res["items"]]
    assert scores == sorted(scores, reverse=True)
    with_seen = rec.recommend([Query(q.history, q.timestamps, k=15, exclude_seen=False)])[0]
    assert with_seen["items"][0]["score"] >= res["items"][0]["score"]
    # by default the run's evaluation rule decides: the demo repeats items, so eval.history=auto
    # resolved to keep, and seen items are recommended as in evaluation
    assert rec.history_mode == "keep"
    assert rec.recommend([Query(q.history, q.timestamps, k=15)])[0] == with_seen


def test_recommender_scores_equal_the_evaluator(rec):
    """The serving path and the full-ranking evaluator agree on a user's test query."""
    from fuxi_mme.data.batches import make_batch
    from fuxi_mme.data.splits import eval_arrays
    from fuxi_mme.eval.evaluator import model_scorer

    ds, cfg = rec.ds, rec.cfg
    arrs = eval_arrays(ds, cfg.data.protocol, "test", cfg.data.max_len)
    r = 5
    u = arrs.users[r]
    items, ts = ds.sequence(u)
    n_hist = arrs.hist_end[r] - arrs.hist_start[r]
    q = Query([ds.item_raw[i].item() for i in items[:n_hist]], [int(t) for t in ts[:n_hist]], k=20, exclude_seen=False, now=int(ts[n_hist]))
    served = rec.recommend([q])[0]["items"]
    scores = model_scorer(rec.model)(make_batch(arrs, np.array([r])))[0]
    scores[0] = -torch.inf
    top = torch.topk(scores, 20).indices.numpy()
    assert [x["item"] for x in served] == [ds.item_raw[i].item() for i in top]


def test_cli_recommend_for_items_and_for_a_dataset_user(run_dir, rec, capsys, monkeypatch):
    q = _hist(rec, 0, 5)
    assert main(["recommend", "--run", str(run_dir), "--items", *map(str, q.history), "-k", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["items"]) == 5
    assert main(["recommend", "--run", str(run_dir), "--user", str(rec.ds.user_raw[0]), "-k", "3"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) == 3  # a pipe: the bare lines
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: a heading above them
    assert main(["recommend", "--run", str(run_dir), "--user", str(rec.ds.user_raw[0]), "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "item", "score", "title"] and len(lines) == 4 and lines[1].startswith("  1. ")
    monkeypatch.undo()
    assert main(["recommend", "--run", str(run_dir), "--items", "no-such-item"]) == 2
    assert "is in the model's catalogue" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_cli_recommend_for_a_file_of_users(run_dir, rec, tmp_path, capsys, suffix):
    rows = []
    for u in range(3):
        q = _hist(rec, u, 6)
        rows += [{"user": f"u{u}", "item": i, "timestamp": t} for i, t in zip(q.history, q.timestamps)]
    rows.append({"user": "ghost", "item": 999_999, "timestamp": 1})  # no known item: skipped, reported
    inp = tmp_path / f"in{suffix}"
    df = pd.DataFrame(rows)
    {
        ".csv": lambda: df.to_csv(inp, index=False),
        ".parquet": lambda: df.to_parquet(inp),
        ".jsonl": lambda: df.to_json(inp, orient="records", lines=True),
    }[suffix]()
    out = tmp_path / f"out{suffix}"
    assert main(["recommend", "--run", str(run_dir), "--input", str(inp), "--output", str(out), "-k", "4"]) == 0
    cap = capsys.readouterr()
    assert "user 'ghost' skipped" in cap.err
    res = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True)}[suffix](out)
    assert list(res.columns) == ["user", "rank", "item", "score", "title"]
    assert len(res) == 12 and sorted(res["user"].unique()) == ["u0", "u1", "u2"]
    # matches the single-query path
    q = _hist(rec, 1, 6)
    single = rec.recommend([Query(q.history, q.timestamps, k=4)])[0]
    assert res[res.user == "u1"]["item"].tolist() == [x["item"] for x in single["items"]]


def test_cli_recommend_reads_the_column_names_training_reads_and_millisecond_times(run_dir, rec, tmp_path, capsys):
    """A file with training's column names (user_id, item_id, ts) needs no --user-col; times in
    milliseconds are read as training reads them (seconds), with a note; one request at a time."""
    q = _hist(rec, 1, 6)
    df = pd.DataFrame({"user_id": ["u1"] * 6, "item_id": q.history, "ts": q.timestamps})
    inp, out = tmp_path / "in.csv", tmp_path / "out.csv"
    df.to_csv(inp, index=False)
    assert main(["recommend", "--run", str(run_dir), "--input", str(inp), "--output", str(out), "-k", "4"]) == 0
    single = rec.recommend([Query(q.history, q.timestamps, k=4)])[0]
    assert pd.read_csv(out)["item"].tolist() == [x["item"] for x in single["items"]]
    millis = rec.recommend([Query(q.history, [t * 1000 + 7 for t in q.timestamps], k=4)])[0]
    assert [x["item"] for x in millis["items"]] == [x["item"] for x in single["items"]]
    assert any("milliseconds" in n for n in millis["notes"])
    capsys.readouterr()
    argv = ["recommend", "--run", str(run_dir), "-k", "2"]
    assert main([*argv, "--items", str(q.history[0]), "--user", str(rec.ds.user_raw[0])]) == 2
    assert "--items and --user are each a whole request; give one of them" in capsys.readouterr().err
    assert main([*argv, "--input", str(tmp_path / "nope.csv"), "--output", str(out)]) == 2
    assert "--input" in capsys.readouterr().err


# ---------------------------------------------------------------- HTTP service


@pytest.fixture(scope="module")
def client(rec):
    from fastapi.testclient import TestClient

    from fuxi_mme.serve.app import create_app

    with TestClient(create_app(rec, max_wait_ms=30, max_body_bytes=64 * 1024)) as c:
        yield c


def test_health_model_and_openapi(client, rec):
    assert client.get("/health").json() == {"status": "ok"}
    m = client.get("/model").json()
    assert m["items"] == rec.num_items and m["dataset"] == "demo" and m["model"] == "fuxi-mme" and m["commit"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/recommend/batch", "/health", "/model"} <= set(paths)


def test_recommend_endpoint_matches_the_library(client, rec):
    q = _hist(rec, 2, 8)
    r = client.post("/recommend", json={"history": q.history, "timestamps": q.timestamps, "k": 7})
    assert r.status_code == 200
    assert r.json()["items"] == rec.recommend([Query(q.history, q.timestamps, k=7)])[0]["items"]


def _err(r, status, text):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert text.lower() in body["error"].lower(), body
    return body


def test_bad_inputs_get_clear_4xx(client, rec):
    q = _hist(rec, 0, 4)
    h, t = q.history, q.timestamps
    # unknown ids: reported (default), ignored, or rejected
    r = client.post("/recommend", json={"history": h + ["nope", 424242], "k": 3})
    assert r.status_code == 200 and r.json()["unknown_items"] == ["nope", 424242]
    r = client.post("/recommend", json={"history": h + ["nope"], "k": 3, "unknown_items": "ignore"})
    assert r.status_code == 200 and "unknown_items" not in r.json()
    _err(client.post("/recommend", json={"history": h + ["nope"], "unknown_items": "reject"}), 422, "not in the model's catalogue")
    _err(client.post("/recommend", json={"history": ["nope"]}), 422, "none of the history")
    _err(client.post("/recommend", json={"history": []}), 422, "history is empty")
    _err(client.post("/recommend", json={"history": h, "timestamps": t[::-1]}), 422, "non-decreasing")
    _err(client.post("/recommend", json={"history": h, "timestamps": t[:2]}), 422, "one timestamp per item")
    _err(client.post("/recommend", json={"history": h, "k": 0}), 422, "k must be between 1 and")
    _err(client.post("/recommend", json={"history": h, "k": rec.num_items + 1}), 422, "catalogue size")
    _err(client.post("/recommend", json={"history": h, "k": "ten"}), 422, "k:")
    _err(client.post("/recommend", json={"history": "1,2,3"}), 422, "history")
    _err(client.post("/recommend", json={"k": 3}), 422, "history: field required")
    _err(client.post("/recommend", json={"history": h, "top_k": 2}), 422, "top_k: unknown field (a request has history, timestamps")
    _err(client.post("/recommend/batch", json={"requests": [{"history": h}], "k": 2}), 422, "k: unknown field")
    _err(client.post("/recommend", content=b'{"history": [1, 2,', headers={"content-type": "application/json"}), 400, "malformed JSON")
    _err(client.post("/recommend", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400, "malformed JSON")
    _err(client.post("/recommend", json={"history": list(range(30_000))}), 413, "over the limit")

    def chunked():  # no Content-Length: the limit is enforced while streaming
        yield b'{"history": ['
        for _ in range(40_000):
            yield b"1,"
        yield b"1]}"

    _err(client.post("/recommend", content=chunked(), headers={"content-type": "application/json"}), 413, "over the limit")
    _err(client.post("/recommend/batch", json={"requests": [{"history": h}, {"history": []}]}), 422, "requests[1]: history is empty")
    _err(client.post("/recommend/batch", json={"requests": []}), 422, "requests is empty")
    # errors="report": the bad query gets its own error, the others their answers, in order
    r = client.post(
        "/recommend/batch", json={"requests": [{"history": h, "k": 3}, {"history": []}, {"history": h, "k": 0}, {"history": h}], "errors": "report"}
    )
    assert r.status_code == 200
    res = r.json()["results"]
    assert [len(x["items"]) for x in res] == [3, 0, 0, 10] and "error" not in res[0] and "error" not in res[3]
    assert res[1]["error"].startswith("history is empty") and "k must be between 1 and" in res[2]["error"]
    alone = client.post("/recommend", json={"history": h, "k": 3}).json()["items"]
    assert [x["item"] for x in res[0]["items"]] == [x["item"] for x in alone]  # scores agree to batching's rounding
    r = client.post("/recommend/batch", json={"requests": [{"history": []}], "errors": "report"})
    assert r.status_code == 200 and r.json()["results"][0]["items"] == []  # none answerable: nothing scored
    _err(client.post("/recommend/batch", json={"requests": [{"history": h}], "errors": "skip"}), 422, "errors")
    _err(client.post("/recommend", json={"history": h, "timestamps": t, "now": 0}), 422, "now")
    # a history longer than max_len: the most recent items are used, and the response says so
    long_q = rec.history_of(rec.ds.user_raw[int(np.argmax(rec.ds.lengths))])
    assert len(long_q.history) > rec.max_len
    r = client.post("/recommend", json={"history": long_q.history, "timestamps": long_q.timestamps, "k": 5})
    assert r.status_code == 200 and r.json()["truncated"] == len(long_q.history) - rec.max_len
    recent = rec.recommend([Query(long_q.history[-rec.max_len :], long_q.timestamps[-rec.max_len :], k=5, exclude_seen=False)])[0]
    r2 = client.post("/recommend", json={"history": long_q.history, "timestamps": long_q.timestamps, "k": 5, "exclude_seen": False})
    assert [x["item"] for x in r2.json()["items"]] == [x["item"] for x in recent["items"]]


def test_concurrent_requests_are_micro_batched_with_the_same_answers(client, rec):
    qs = [_hist(rec, u, 5 + u) for u in range(16)]
    before = client.get("/model").json()
    with ThreadPoolExecutor(16) as pool:
        res = list(pool.map(lambda q: client.post("/recommend", json={"history": q.history, "timestamps": q.timestamps, "k": 5}), qs))
    after = client.get("/model").json()
    assert all(r.status_code == 200 for r in res)
    assert after["queries_served"] - before["queries_served"] == 16
    assert after["micro_batches"] - before["micro_batches"] < 16  # some requests shared a forward pass
    for q, r in zip(qs, res):
        assert [x["item"] for x in r.json()["items"]] == [x["item"] for x in rec.recommend([Query(q.history, q.timestamps, k=5)])[0]["items"]]
    b = client.post("/recommend/batch", json={"requests": [{"history": q.history, "timestamps": q.timestamps, "k": 5} for q in qs[:4]]})
    for got, want in zip(b.json()["results"], res[:4]):
        assert [x["item"] for x in got["items"]] == [x["item"] for x in want.json()["items"]]
        assert [x["score"] for x in got["items"]] == pytest.approx([x["score"] for x in want.json()["items"]], abs=1e-5)


def test_serve_binds_to_localhost_by_default():
    from fuxi_mme.cli import make_parser

    args = make_parser().parse_args(["serve", "--run", "x"])
    assert args.host == "127.0.0.1"


# ---------------------------------------------------------------- demo page in Chromium


def test_demo_page_end_to_end_in_headless_chromium(rec, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from fuxi_mme.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(a)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
    try:
        drv.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(drv, 20)
        wait.until(lambda d: "trained on demo" in d.find_element(By.ID, "model").text)
        title = rec.titles[1]
        drv.find_element(By.ID, "search").send_keys(title[:6])
        first = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#suggestions button")))
        picked = first.text
        first.click()
        assert [li.text.split(" remove")[0] for li in drv.find_elements(By.CSS_SELECTOR, "#history li")] == [picked]
        drv.find_element(By.ID, "search").send_keys(rec.titles[2][:6])
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#suggestions button"))).click()
        k = drv.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        drv.find_element(By.ID, "recommend").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 5)
        shown = [li.text for li in drv.find_elements(By.CSS_SELECTOR, "#results li")]
        assert all("(" in s for s in shown)  # "Title (id) score"
        # a bad request shows the server's message instead of results
        k.clear()
        k.send_keys("0")
        drv.find_element(By.ID, "recommend").click()
        wait.until(lambda d: "k must be between" in d.find_element(By.ID, "error").text)
        drv.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        drv.quit()
        server.should_exit = True
        th.join(timeout=10)


def test_serve_refuses_what_it_cannot_listen_on_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """A port another process listens on, an address not of this machine, or a host name that
    does not resolve is one line naming the fix, before the model loads (it used to log
    "serving ..." and then fail in the server's bind)."""
    import socket

    from fuxi_mme.serve import app

    monkeypatch.setattr(app, "serve", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--run", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fuxi-mme: error: cannot listen on 127.0.0.1:{port}: ") and err.endswith("pass another --port") and "\n" not in err
    assert main(["serve", "--run", str(tmp_path), "--host", "192.0.2.1"]) == 2  # TEST-NET-1: no machine's own address
    assert "not an address of this machine" in capsys.readouterr().err
    assert main(["serve", "--run", str(tmp_path), "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid:" in capsys.readouterr().err
