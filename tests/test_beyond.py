"""Beyond-accuracy metrics (eval/beyond.py, docs/training.md#beyond-accuracy-metrics): known
answers on hand-made lists, a brute-force cross-check on the demo data, item features, two
processes equal to one, the printed block and the switch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import shared
from fuxi_mme.config import DataConfig
from fuxi_mme.data import load_dataset
from fuxi_mme.data.features import item_features
from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.splits import eval_arrays, split_points
from fuxi_mme.eval.beyond import BeyondAccumulator, Popularity, beyond_block, beyond_metrics, gini, long_tail, popularity
from fuxi_mme.eval.evaluator import evaluate_split, popularity_scorer

NEG = -math.inf
ROOT = Path(__file__).resolve().parents[1]


def test_gini_known_answers():
    assert gini(np.array([3, 3, 3, 3])) == 0.0
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)  # (n - 1) / n: one item takes every slot
    assert gini(np.array([4, 1, 3, 2])) == pytest.approx(0.25)  # sum (2i - 5) c_(i) = 10 over n * sum = 40
    assert gini(np.zeros(5)) == 0.0


def test_long_tail_is_outside_the_items_that_make_80_percent():
    assert long_tail(np.array([0, 50, 30, 10, 5, 5])).tolist() == [False, False, False, True, True, True]
    assert long_tail(np.array([0, 10, 90, 0])).tolist() == [False, True, False, True]  # 90% from item 2 alone
    assert long_tail(np.array([0, 40, 40, 20])).tolist() == [False, False, False, True]  # exactly 80%
    assert long_tail(np.array([0, 1, 1, 1, 1, 1])).tolist() == [False, False, False, False, False, True]  # ties by id
    assert long_tail(np.zeros(3, dtype=int)).tolist() == [False, True, True]  # no interactions: all tail


# hand-made case: 5 items; features a/b/c, item 4 has none
FEATS = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=bool)
POP = Popularity(
    interactions=np.array([0, 6, 2, 1, 1, 0]),
    users=np.array([0, 4, 2, 1, 1, 0]),
    train_users=4,
    tail=long_tail(np.array([0, 6, 2, 1, 1, 0])),  # head {1, 2}: 8 of 10
)


def _scores(lists: list[list[int]], num_items: int = 5) -> torch.Tensor:
    """Scores whose descending order starts with ``lists[u]``; every other item at -inf."""
    s = torch.full((len(lists), num_items + 1), NEG)
    for u, items in enumerate(lists):
        for pos, it in enumerate(items):
            s[u, it] = 10.0 - pos
    return s


def test_known_answers_on_hand_made_lists():
    acc = BeyondAccumulator((2, 1), 5, FEATS, "cpu")  # cut-offs in any order
    assert acc.ks == (1, 2)
    ild = acc.add(_scores([[1, 2], [1, 3], [2]]))  # the third list has one item: the rest is masked
    counts = acc.counts()
    assert counts[:, 1:].tolist() == [[2, 1, 0, 0, 0], [2, 2, 1, 0, 0]]
    m = beyond_metrics(counts, acc.ks, POP, ild.numpy())
    assert m["Coverage@1"] == pytest.approx(2 / 5) and m["Coverage@2"] == pytest.approx(3 / 5)
    assert m["Gini@1"] == pytest.approx((2 * 1 + 4 * 2) / (5 * 3))  # sorted [0, 0, 0, 1, 2]
    assert m["Gini@2"] == pytest.approx((0 * 1 + 2 * 2 + 4 * 2) / (5 * 5))  # sorted [0, 0, 1, 2, 2]
    assert m["Entropy@1"] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert m["Entropy@2"] == pytest.approx(-2 * 0.4 * math.log2(0.4) - 0.2 * math.log2(0.2))
    # self-information: item 1 seen by 4 of 4 training users -> 0 bits, item 2 by 2 -> 1, item 3 by 1 -> 2
    assert m["Novelty@1"] == pytest.approx((2 * 0 + 1 * 1) / 3)
    assert m["Novelty@2"] == pytest.approx((2 * 0 + 2 * 1 + 1 * 2) / 5)
    assert m["AvgPop@1"] == pytest.approx((2 * 6 + 2) / 3) and m["AvgPop@2"] == pytest.approx((2 * 6 + 2 * 2 + 1) / 5)
    assert m["LongTail@1"] == 0.0 and m["LongTail@2"] == pytest.approx(1 / 5)
    # ILD@2: [1, 2] -> 1 - cos({a}, {a, b}) = 1 - 1/sqrt(2); [1, 3] -> 1; [2] has no pair (left out)
    assert m["ILD@2"] == pytest.approx((1 - 1 / math.sqrt(2) + 1) / 2, abs=1e-6)
    assert "ILD@1" not in m  # no list of one item has a pair
    assert m["catalogue"] == 5 and m["head_items"] == 2


def test_ild_leaves_out_featureless_items_and_unseen_items_count_as_one_user():
    acc = BeyondAccumulator((3,), 5, FEATS, "cpu")
    ild = acc.add(_scores([[1, 4, 3], [2, 5, 4], [4, 5, 1]]))
    m = beyond_metrics(acc.counts(), acc.ks, POP, ild.numpy())
    # [1, 4, 3]: the pair (1, 3) -> 1; [2, 5, 4]: (2, 5) -> 1 - 1/sqrt(2); [4, 5, 1]: (5, 1) -> 1
    assert m["ILD@3"] == pytest.approx((1 + 1 - 1 / math.sqrt(2) + 1) / 3, abs=1e-6)
    # item 5 has no training user: it counts as one of 4 (2 bits), never an infinite surprise
    assert m["Novelty@3"] == pytest.approx((2 * 0 + 1 * 1 + 1 * 2 + 3 * 2 + 2 * 2) / 9)
    none = BeyondAccumulator((3,), 5, None, "cpu")
    assert none.add(_scores([[1, 2, 3]])) is None
    m = beyond_metrics(none.counts(), none.ks, POP, None, "ILD skipped: no features")
    assert "ILD@3" not in m and m["notes"] == ["ILD skipped: no features"]


def test_a_cut_off_beyond_the_catalogue_and_an_all_masked_batch():
    acc = BeyondAccumulator((2, 50), 3, None, "cpu")
    acc.add(_scores([[3, 1], []], num_items=3))
    m = beyond_metrics(acc.counts(), acc.ks, Popularity(np.array([0, 1, 1, 1]), np.array([0, 1, 1, 1]), 1, long_tail(np.array([0, 1, 1, 1]))))
    assert m["Coverage@2"] == pytest.approx(2 / 3) and m["Coverage@50"] == pytest.approx(2 / 3)


def test_popularity_reads_the_training_part_only():
    # user 0: 1 1 2 | 3 ; user 1: 2 4 | 5 (paper: the last item is the test target)
    df = pd.DataFrame({"user": [0, 0, 0, 0, 1, 1, 1], "item": [1, 1, 2, 3, 2, 4, 5], "timestamp": [1, 2, 3, 4, 1, 2, 3]})
    ds, _ = build_prepared(df, "t")
    pop = popularity(ds, split_points(ds, "paper")["train_end"])
    assert pop.interactions.tolist() == [0, 2, 2, 0, 1, 0]
    assert pop.users.tolist() == [0, 1, 2, 0, 1, 0] and pop.train_users == 2
    pop_loo = popularity(ds, split_points(ds, "loo-val")["train_end"])  # the validation targets (2, 4) are not training
    assert pop_loo.interactions.tolist() == [0, 2, 1, 0, 0, 0]


# ------------------------------------------------------------------ against brute force


def _brute_force(scores: np.ndarray, arrs, ds, ks, feats: np.ndarray, train_end: np.ndarray) -> dict[str, float]:
    """Per user: mask, sort, take the top k; count with Counter, ILD with pairwise set loops."""
    users_of: dict[int, set[int]] = {}
    inter: Counter[int] = Counter()
    for u in range(ds.num_users):
        for it in ds.items[ds.offsets[u] : train_end[u]]:
            users_of.setdefault(int(it), set()).add(u)
            inter[int(it)] += 1
    n_train = sum(train_end[u] > ds.offsets[u] for u in range(ds.num_users))
    total = sum(inter.values())
    by_pop = sorted(range(1, ds.num_items + 1), key=lambda i: (-inter[i], i))
    head, run = set(), 0
    for i in by_pop:
        if run >= 0.8 * total:
            break
        head.add(i)
        run += inter[i]
    sets = [set(np.flatnonzero(feats[i]).tolist()) for i in range(len(feats))]
    out: dict[str, float] = {}
    for k in ks:
        count: Counter[int] = Counter()
        ilds = []
        for r in range(len(arrs)):
            s = scores[r].astype(np.float64).copy()
            s[0] = -np.inf
            s[ds.items[arrs.hist_start[r] : arrs.hist_end[r]]] = -np.inf
            top = [int(i) for i in np.argsort(-s, kind="stable")[:k] if np.isfinite(s[i])]
            count.update(top)
            f = [i for i in top if sets[i]]
            pairs = [(a, b) for x, a in enumerate(f) for b in f[x + 1 :]]
            if pairs:
                ilds.append(np.mean([1 - len(sets[a] & sets[b]) / math.sqrt(len(sets[a]) * len(sets[b])) for a, b in pairs]))
        n = sum(count.values())
        c = np.array([count[i] for i in range(1, ds.num_items + 1)], dtype=np.float64)
        p = c[c > 0] / n
        out[f"Coverage@{k}"] = (c > 0).mean()
        out[f"Gini@{k}"] = np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean())  # the mean-difference form
        out[f"Entropy@{k}"] = -(p * np.log2(p)).sum()
        out[f"Novelty@{k}"] = sum(v * -math.log2(max(len(users_of.get(i, ())), 1) / n_train) for i, v in count.items()) / n
        out[f"AvgPop@{k}"] = sum(v * inter[i] for i, v in count.items()) / n
        out[f"LongTail@{k}"] = sum(v for i, v in count.items() if i not in head) / n
        out[f"ILD@{k}"] = float(np.mean(ilds))
    return out


def _demo(users: int = 120):
    return load_dataset(DataConfig(name="demo", demo_users=users))


def test_evaluator_agrees_with_brute_force_on_the_demo_data():
    ds = _demo()
    arrs = eval_arrays(ds, "loo-val", "test", max_len=20)
    table = np.random.default_rng(0).normal(size=(len(arrs), ds.num_items + 1)).astype(np.float32)
    scorer = lambda b: torch.tensor(table[b.rows])  # noqa: E731
    ks = (5, 20)
    m = evaluate_split(scorer, arrs, ds, split="test", history="mask", ks=ks, batch_size=32, protocol="loo-val")
    feats, why = item_features(ds)
    assert feats is not None and why == "" and feats.matrix.sum(1)[1:].tolist() == [2] * ds.num_items  # genre and style
    want = _brute_force(table, arrs, ds, ks, feats.matrix, split_points(ds, "loo-val")["train_end"])
    for key, v in want.items():
        assert m["beyond"][key] == pytest.approx(v, rel=1e-6, abs=1e-6), key
    # without the protocol: each user's events before its test target (the validation item is in)
    alt = evaluate_split(scorer, arrs, ds, split="test", history="mask", ks=ks, batch_size=32)
    want = _brute_force(table, arrs, ds, ks, feats.matrix, arrs_end(ds, arrs))
    assert alt["beyond"]["Novelty@5"] == pytest.approx(want["Novelty@5"], rel=1e-9)


def arrs_end(ds, arrs) -> np.ndarray:
    end = ds.offsets[:-1].copy()
    end[arrs.users] = arrs.hist_end
    return end


def test_accuracy_metrics_unchanged_and_the_switch():
    ds = _demo()
    arrs = eval_arrays(ds, "loo-val", "valid", max_len=20)
    sc = popularity_scorer(ds, "loo-val")
    on = evaluate_split(sc, arrs, ds, split="valid", history="mask", ks=(10,), protocol="loo-val")
    off = evaluate_split(sc, arrs, ds, split="valid", history="mask", ks=(10,), protocol="loo-val", beyond=False)
    assert "beyond" not in off and {k: v for k, v in on.items() if k != "beyond"} == off
    b = on["beyond"]
    assert set(b) >= {"Coverage@10", "Gini@10", "Entropy@10", "Novelty@10", "AvgPop@10", "LongTail@10", "ILD@10"}
    # the popularity baseline recommends head items: no tail, low novelty, high concentration
    assert b["LongTail@10"] == 0.0 and b["Gini@10"] > 0.9


# ------------------------------------------------------------------ item features


def test_movielens_genres_map_to_prepared_ids(tmp_path):
    src = tmp_path / "ml-1m"
    src.mkdir()
    ratings = ["1::30::5::1", "1::10::4::2", "1::20::3::3", "2::20::5::1", "2::40::2::2"]
    (src / "ratings.dat").write_text("\n".join(ratings) + "\n")
    (src / "movies.dat").write_bytes(
        "10::A (1995)::Comedy|Drama\n20::B (1995)::Drama\n30::C\xe9 (1995)::Horror\n40::D (1995)::\n50::E (1995)::Comedy\n".encode("latin-1")
    )
    ds = load_dataset(DataConfig(name="ml-1m", path=str(src)))
    feats, why = item_features(ds)
    assert feats is not None and why == ""
    assert feats.names == ["Comedy", "Drama", "Horror"]
    # prepared ids follow the sorted raw ids: 1 -> 10, 2 -> 20, 3 -> 30, 4 -> 40 (no genre)
    assert ds.item_raw[1:].tolist() == [10, 20, 30, 40]
    assert feats.matrix.astype(int).tolist() == [[0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert feats.covered == 3


def test_datasets_without_features_skip_ild_with_a_note():
    df = pd.DataFrame({"user": [0, 0, 0, 1, 1, 1], "item": [1, 2, 3, 2, 3, 1], "timestamp": [1, 2, 3, 1, 2, 3]})
    ds, _ = build_prepared(df, "amazon-beauty")
    feats, why = item_features(ds)
    assert feats is None and "amazon-beauty" in why
    arrs = eval_arrays(ds, "paper", "test", max_len=5)
    m = evaluate_split(popularity_scorer(ds, "paper"), arrs, ds, split="test", history="keep", ks=(2,), protocol="paper")
    assert "ILD@2" not in m["beyond"] and m["beyond"]["notes"][0].startswith("ILD skipped: amazon-beauty")


def test_ml100k_genres_from_shared_data():
    ds = load_dataset(DataConfig(name="ml-100k", path=str(shared("ml-100k"))))
    feats, _ = item_features(ds)
    assert feats is not None and len(feats.names) == 18 and "unknown" not in feats.names
    toy = ds.item_index()[1]  # Toy Story: Animation, Children's, Comedy
    assert sorted(np.array(feats.names)[feats.matrix[toy]].tolist()) == ["Animation", "Children's", "Comedy"]
    assert feats.covered >= ds.num_items - 2  # a couple of films have only the 'unknown' genre


# ------------------------------------------------------------------ two processes, printing


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torch.distributed as dist
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import load_dataset
    from fuxi_mme.data.splits import eval_arrays
    from fuxi_mme.eval.evaluator import evaluate_split

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = load_dataset(DataConfig(name="demo", demo_users=90))
    arrs = eval_arrays(ds, "loo-val", "test", max_len=20)
    table = np.random.default_rng(1).normal(size=(len(arrs), ds.num_items + 1)).astype(np.float32)
    scorer = lambda b: torch.tensor(table[b.rows])
    def gather(obj):
        got = [None] * world
        dist.all_gather_object(got, obj)
        return got
    kw = dict(split="test", history="mask", ks=(3, 10, 40), batch_size=8, protocol="loo-val")
    out = {"dist": evaluate_split(scorer, arrs, ds, rank=rank, world=world, gather=gather, **kw), "one": evaluate_split(scorer, arrs, ds, **kw)}
    if rank == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "out.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["dist"]["beyond"] == out["one"]["beyond"]  # exactly: counts summed, diversity in batch order
    assert out["dist"] == out["one"] and "ILD@40" in out["one"]["beyond"]
    assert out["dist"]["buckets"] == out["one"]["buckets"] and sum(b["users"] for b in out["one"]["buckets"].values()) == out["one"]["users"]


def test_printed_block_and_table():
    from fuxi_mme.commands import metrics_table

    b = {"Coverage@10": 0.5, "Gini@10": 0.25, "Novelty@10": 3.0, "AvgPop@10": 1234.5, "LongTail@10": 0.1, "notes": ["ILD skipped: x"]}
    rows = {"valid (epoch 3)": {"NDCG@10": 0.1, "beyond": b}, "test": {"NDCG@10": 0.2, "beyond": b}, "  test: repeat targets": {"NDCG@10": 0.3}}
    text = metrics_table(rows, "title")
    head, block = text.split("\n\n")
    assert "beyond" not in head.splitlines()[1]  # the first table keeps its columns
    lines = block.splitlines()
    assert lines[0].split() == ["beyond", "accuracy", "Coverage", "Gini", "Entropy", "Novelty", "AvgPop", "LongTail", "ILD"]
    assert lines[1].split() == ["valid", "@10", "0.5000", "0.2500", "-", "3.0000", "1234.5", "0.1000", "-"]
    assert lines[2].startswith("test @10") and lines[3] == "note: ILD skipped: x" and len(lines) == 4
    assert beyond_block({"test": {"NDCG@10": 0.2}}) == ""
    small = {"AvgPop@10": 98.76, "Novelty@10": 3.0}  # AvgPop keeps one decimal below 100 too
    assert beyond_block({"test": {"beyond": small}}).splitlines()[-1].split()[2:7] == ["-", "-", "-", "3.0000", "98.8"]


def test_batch_size_changes_no_metric():
    ds = _demo(60)
    arrs = eval_arrays(ds, "loo-val", "test", max_len=20)
    table = np.random.default_rng(2).normal(size=(len(arrs), ds.num_items + 1)).astype(np.float32)
    scorer = lambda b: torch.tensor(table[b.rows])  # noqa: E731
    a = evaluate_split(scorer, arrs, ds, split="test", history="keep", ks=(10, 30), batch_size=7, protocol="loo-val")["beyond"]
    b = evaluate_split(scorer, arrs, ds, split="test", history="keep", ks=(10, 30), batch_size=64, protocol="loo-val")["beyond"]
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("ILD"):  # float sums in another grouping
            assert a[key] == pytest.approx(b[key], rel=1e-9)
        else:  # everything else comes from integer counts
            assert a[key] == b[key], key


# ------------------------------------------------------------------ aggregates, results page, report


def _runs(tmp_path, covs):
    out = []
    for i, c in enumerate(covs):
        test = {"NDCG@10": 0.1 + i / 100, "HR@10": 0.2, "MRR": 0.05}
        if c is not None:
            test["beyond"] = {"Coverage@10": c, "Gini@10": 0.8, "Novelty@10": 5.0 + i, "ILD@10": 0.6, "Entropy@10": 7.0}
        out.append({"protocol": "loo-val", "run_dir": str(tmp_path / f"seed{i}"), "test": test})
    return out


def test_aggregates_tables_and_page_show_beyond_columns_only_where_runs_have_them(tmp_path):
    from fuxi_mme.experiments.aggregate import _row
    from fuxi_mme.experiments.page import main_sections
    from fuxi_mme.experiments.tables import beyond_table, markdown

    new = _row("demo", "fuxi-mme", _runs(tmp_path, [0.2, 0.4]), [])
    assert new["test/Coverage@10"] == {"mean": pytest.approx(0.3), "std": pytest.approx(math.sqrt(0.02))}
    assert new["test/Novelty@10"]["mean"] == pytest.approx(5.5) and "test/Entropy@10" not in new  # a few columns only
    mixed = _row("demo", "sasrec", _runs(tmp_path, [0.2, None]), [])  # a seed without them: no mean over the others
    old = _row("demo", "hstu", _runs(tmp_path, [None, None]), [])
    assert not any("Coverage" in k for k in mixed) and not any("Coverage" in k for k in old)
    res = {"suite": "main", "description": "d", "commit": "c", "time": "t", "failed": [], "results": [old]}
    table = markdown(res)
    assert "| valid NDCG@10 | test NDCG@10 | test HR@10 | test MRR | params (non-emb.) | train s | GPU |" in table  # as before
    assert beyond_table(res) == "" and not any("Beyond" in s for s in main_sections(res))
    res["results"] = [old, new]
    table = markdown(res).splitlines()
    head = next(x for x in table if x.startswith("| dataset"))
    assert "| test MRR | test Cov@10 | test Gini@10 | test Nov@10 | test ILD@10 | params" in head
    rows = [x for x in table if x.startswith("| demo")]
    assert len(head.split("|")) == len(table[table.index(head) + 1].split("|")) == len(rows[0].split("|")) == len(rows[1].split("|"))
    assert "| - | - | - | - |" in rows[0] and "0.3000 ± 0.1414 | 0.8000 ± 0.0000 | 5.50 ± 0.71 | 0.6000 ± 0.0000 |" in rows[1]
    page = "\n".join(main_sections(res))
    assert "### Beyond accuracy" in page and "| demo | fuxi-mme | 2 | 0.1050 ± 0.0071 | 0.3000 ± 0.1414 |" in page
    assert "| demo | hstu |" not in beyond_table(res)


def test_run_report_shows_beyond_columns_and_notes():
    from fuxi_mme.experiments.report import table

    run = {"name": "r", "config": {"data": {"name": "demo", "protocol": "loo-val"}, "model": {"name": "sasrec"}}, "info": {}, "records": []}
    fin = {"test": {"NDCG@10": 0.1, "beyond": {"Coverage@10": 0.25, "Gini@10": 0.5, "Novelty@10": 4.0, "notes": ["ILD skipped: x"]}}}
    md = table([{**run, "final": fin}, {**run, "name": "old", "final": {"test": {"NDCG@10": 0.1}}}]).splitlines()
    assert md[0].endswith("| MRR | Coverage@10 | Gini@10 | Novelty@10 | ILD@10 |")
    assert md[2].endswith("| 0.2500 | 0.5000 | 4.0000 | - |") and md[3].endswith("| - | - | - | - |")


def test_overhead_benchmark_quick_run(tmp_path):
    out = tmp_path / "eval-overhead.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_overhead.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["users"] == 300 and len(run["off_s_all"]) == len(run["on_s_all"]) == 2 and run["off_s"] > 0 and run["on_s"] > 0
    assert run["added"] == pytest.approx(run["on_s"] / run["off_s"] - 1) and run["ild"] and "ILD@10" in run["beyond"]
    assert run["device"]["device"] == "cpu" and run["versions"]["torch"] == torch.__version__ and run["commit"]
    assert "| demo-fuxi-mme-base data.demo_users=300 data.max_len=50 | test | 300 /" in out.with_suffix(".md").read_text()


def test_the_page_compares_fuxi_mme_diversity_with_welch_and_reads_gini_the_right_way():
    from fuxi_mme.experiments.page import main_sections
    from fuxi_mme.experiments.tables import diversity_comparison

    def row(variant, ndcg, cov, gini, seeds=3, spread=0.001):
        e = {"dataset": "ml-100k", "variant": variant, "protocol": "loo-val", "seeds": seeds}
        for key, v in (("test/NDCG@10", ndcg), ("test/Coverage@10", cov), ("test/Gini@10", gini), ("test/Novelty@10", 3.0), ("test/ILD@10", 0.6)):
            e[key] = {"mean": v, "std": spread}
        return e

    res = {"results": [row("fuxi-mme", 0.100, 0.60, 0.70), row("fuxi-alpha", 0.100, 0.40, 0.80), row("sasrec", 0.120, 0.60, 0.60)]}
    lines = diversity_comparison(res).splitlines()[2:]
    alpha, sasrec = lines
    assert "| ml-100k | fuxi-alpha (3) | 3 |" in alpha and "NDCG@10 +0.0000 (t 0.0, level)" in alpha
    assert "Coverage@10 +0.2000" in alpha and "more diverse)" in alpha.split("Coverage@10")[1].split(";")[0]
    assert "Gini@10 -0.1000" in alpha and "more diverse" in alpha.split("Gini@10")[1].split(";")[0]  # lower Gini: more even
    assert "NDCG@10 -0.0200" in sasrec and "behind" in sasrec.split(";")[0]
    assert "less diverse" in sasrec.split("Gini@10")[1].split(";")[0] and "Coverage@10 +0.0000 (t 0.0, level)" in sasrec
    from fuxi_mme.experiments.tables import diversity_answer

    first, second = diversity_answer(res).strip().split("\n\n")
    assert first == (
        "**ml-100k**: against FuXi-alpha, Fuxi-MME is level in accuracy (NDCG@10); of 4 diversity measures it is "
        "more diverse on 2 (Coverage, Gini), less diverse on none and level on 2 (Novelty, ILD)."
    )
    assert second.startswith("**ml-100k**: against SASRec, Fuxi-MME is behind in accuracy (NDCG@10);")
    assert "more diverse on none, less diverse on 1 (Gini) and level on 3" in second
    one = {"results": [row("fuxi-mme", 0.1001, 0.31, 0.70, seeds=1), row("fuxi-alpha", 0.1000, 0.30, 0.80, seeds=1)]}
    assert "NDCG@10 +0.0001 (one seed: not tested)" in diversity_comparison(one)  # no spread: no verdict
    assert diversity_answer(one).strip() == "**ml-100k**: against FuXi-alpha: one seed on a side, not tested."
    page = "\n".join(main_sections({"suite": "main", "description": "d", "commit": "c", "time": "t", "failed": [], **res}))
    assert "Does Fuxi-MME recommend more diversely" in page and first in page
    del res["results"][0]["test/Coverage@10"]  # runs from before the metrics: no comparison
    assert diversity_comparison(res) == ""


# ------------------------------------------------------------------ CPU forward chunks
def test_forward_chunks_fill_a_token_budget_in_length_order():
    from fuxi_mme.eval.evaluator import forward_chunks

    lengths = np.array([1, 2, 2, 3, 5, 8, 8, 20])
    got = [(c.start, c.stop) for c in forward_chunks(lengths, 8)]
    # rows 0-2 fit (3 rows x length 2 = 6); a 4th would make 4 x 3 = 12 > 8
    assert got == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)]  # a row longer than the budget runs alone
    assert [(c.start, c.stop) for c in forward_chunks(lengths, 10**6)] == [(0, 8)]
    assert forward_chunks(np.array([], dtype=np.int64), 8) == []


@pytest.mark.parametrize("model", ["fuxi-mme", "fuxi-alpha", "sasrec", "hstu", "fuxi-mme model.denoise=filter", "ssm"])
def test_a_cpu_evaluation_in_forward_chunks_equals_one_pass(model, monkeypatch):
    """The model runs on length chunks of each scoring batch on a CPU: every metric, the
    beyond-accuracy ones and the buckets included, equals one pass over the whole batch (on
    this data no near-tie is swapped by the last-bit differences of another padded width)."""
    from conftest import tiny_config
    from fuxi_mme.eval import evaluator
    from fuxi_mme.models import build_model

    name, *sets = model.split()
    cfg = tiny_config(name, **dict(x.split("=") for x in sets))
    ds = load_dataset(cfg.data)
    torch.manual_seed(0)
    net = build_model(cfg.model, ds.num_items, cfg.data.max_len).eval()
    arrs = eval_arrays(ds, cfg.data.protocol, "test", cfg.data.max_len)
    kw = dict(split="test", history="mask", ks=(10, 50), batch_size=256, protocol=cfg.data.protocol)
    calls: list[int] = []
    scorer = evaluator.model_scorer(net)

    def counting(batch):
        calls.append(len(batch.rows))
        return scorer(batch)

    monkeypatch.setattr(evaluator, "FORWARD_TOKENS_CPU", 10**9)
    whole = evaluator.evaluate_split(counting, arrs, ds, **kw)
    passes_whole = len(calls)
    monkeypatch.setattr(evaluator, "FORWARD_TOKENS_CPU", 64)
    chunked = evaluator.evaluate_split(counting, arrs, ds, **kw)
    assert len(calls) - passes_whole > 3 * passes_whole  # many more, smaller forward passes
    assert json.dumps(chunked, sort_keys=True) == json.dumps(whole, sort_keys=True)
