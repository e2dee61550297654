"""Target-blind history masking (eval.history), repeat-aware reporting, data.repeats, and
non-finite scores (docs/training.md#history-masking)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuxi_mme.config import Config, ConfigError, apply_overrides, config_from_dict, validate
from fuxi_mme.data.batches import make_batch
from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.repeats import apply_repeats, repeat_flags, repeat_summary
from fuxi_mme.data.splits import eval_arrays
from fuxi_mme.eval.evaluator import NonFiniteScores, evaluate_split, popularity_scorer, rank_split, resolve_history
from fuxi_mme.eval.metrics import ranks_from_scores

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ds(seqs):
    rows = [(u, it, t) for u, seq in enumerate(seqs) for t, it in enumerate(seq)]
    ds, _ = build_prepared(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), "t")
    return ds


def _table_scorer(table):
    return lambda batch: torch.tensor(table[batch.rows], dtype=torch.float32)


@settings(max_examples=60, deadline=None)
@given(
    hist=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    scores=st.lists(st.integers(-3, 3), min_size=9, max_size=9),
    mode=st.sampled_from(["mask", "keep"]),
)
def test_what_is_masked_never_depends_on_the_target(hist, scores, mode):
    """Users with the same history and every possible target: each target's rank is its rank
    among one candidate set fixed by the history alone (integer scores: many ties)."""
    items = list(range(1, 10))
    ds = _ds([hist + [t] for t in items])  # raw ids 1..9 map to internal ids 1..9 (all appear)
    arrs = eval_arrays(ds, "paper", "test", max_len=8)
    row_scores = np.array([0.0] + [float(s) for s in scores])
    table = np.tile(row_scores, (len(arrs), 1))
    got = rank_split(_table_scorer(table), arrs, ds, mode, batch_size=4).ranks
    masked = set(hist) if mode == "mask" else set()  # from the history only
    for row, target in enumerate(arrs.targets):
        if target in masked:
            assert got[row] == ds.num_items + 1  # a masked (repeated) target is a miss
        else:
            better = [j for j in items if j not in masked and row_scores[j] > row_scores[target]]
            assert got[row] == 1 + len(better)


def _repeat_fixture():
    # users 0-2: the test target (last) repeats a history item; users 3-5: new targets; every
    # training part also repeats (so auto picks keep)
    seqs = [[1, 2, 1, 3, 2], [4, 5, 4, 6, 4], [7, 7, 8, 9, 8], [1, 2, 1, 3, 9], [4, 5, 4, 6, 7], [7, 7, 8, 9, 1]]
    return _ds(seqs)


def test_repeated_targets_mask_counts_misses_keep_ranks_auto_keeps():
    ds = _repeat_fixture()
    arrs = eval_arrays(ds, "paper", "test", max_len=10)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(arrs), ds.num_items + 1))
    scorer = _table_scorer(table)
    mode, why = resolve_history("auto", ds, "paper")
    assert mode == "keep" and "repeat" in why
    masked = evaluate_split(scorer, arrs, ds, split="test", history="mask", ks=(1, 5))
    assert masked["repeat_targets"]["users"] == 3 and masked["repeat_targets"]["masked"] == 3
    assert masked["repeat_targets"]["HR@5"] == 0.0 and masked["new_targets"]["users"] == 3
    kept = evaluate_split(scorer, arrs, ds, split="test", history="keep", ks=(1, 5))
    # under keep nothing is masked: ranks are 1 + the number of strictly higher items
    want = [1 + int((np.delete(table[r], [0, t]) > table[r, t]).sum()) for r, t in enumerate(arrs.targets)]
    np.testing.assert_array_equal(rank_split(scorer, arrs, ds, "keep").ranks, want)
    assert kept["repeat_targets"]["HR@5"] == np.mean([w <= 5 for w, rep in zip(want, [1, 1, 1, 0, 0, 0]) if rep])
    assert "masked" not in kept["repeat_targets"]


def _old_masking_ranks(scores, arrs, ds):
    """The evaluator before target-blind masking: the history masked except the target."""
    out = []
    for r in range(len(arrs)):
        s = scores[r].copy()
        s[0] = -np.inf
        hist = ds.items[arrs.hist_start[r] : arrs.hist_end[r]]
        s[hist[hist != arrs.targets[r]]] = -np.inf
        out.append(1 + int((s > s[arrs.targets[r]]).sum()))
    return np.array(out)


def test_without_repeats_auto_masks_and_gives_the_old_ranks():
    rng = np.random.default_rng(1)
    ds = _ds([list(rng.permutation(np.arange(1, 30))[: rng.integers(3, 12)]) for _ in range(50)])
    assert repeat_summary(ds, "loo-val")["repeat_rate"] == 0.0
    assert resolve_history("auto", ds, "loo-val")[0] == "mask"
    for split in ("valid", "test"):
        arrs = eval_arrays(ds, "loo-val", split, max_len=6)
        table = np.round(rng.normal(size=(len(arrs), ds.num_items + 1)), 1)
        np.testing.assert_array_equal(rank_split(_table_scorer(table), arrs, ds, "mask").ranks, _old_masking_ranks(table, arrs, ds))


@pytest.mark.parametrize("name,source", [("ml-100k", "ml-100k"), ("amazon-beauty", "amazon_s3rec/Beauty.txt")])
def test_published_data_have_no_repeats_and_keep_their_ranks(name, source, tmp_path):
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import load_dataset

    if not (SHARED / source).exists():
        pytest.skip(f"{SHARED / source} is not present")
    ds = load_dataset(DataConfig(name=name, path=str(SHARED / source), data_dir=str(tmp_path)))
    rep = repeat_summary(ds, "loo-val")
    assert rep["valid_repeat_targets"] == 0 and rep["test_repeat_targets"] == 0
    assert resolve_history("auto", ds, "loo-val")[0] == "mask"
    arrs = eval_arrays(ds, "loo-val", "test", max_len=50)
    rows = np.arange(min(len(arrs), 400))
    scorer = popularity_scorer(ds, "loo-val")
    got = rank_split(scorer, arrs, ds, "mask", rows=rows).ranks
    counts = scorer(make_batch(arrs, rows[:1]))[0].numpy()
    sub = eval_arrays(ds, "loo-val", "test", max_len=50)
    want = _old_masking_ranks(np.tile(counts, (len(rows), 1)), _take(sub, rows), ds)
    np.testing.assert_array_equal(got, want)


def _take(arrs, rows):
    import dataclasses

    fields = {f.name: getattr(arrs, f.name) for f in dataclasses.fields(arrs)}
    return dataclasses.replace(arrs, **{k: v[rows] for k, v in fields.items() if v is not None})  # behaviors: None without them


WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pandas as pd, torch, torch.distributed as dist
    from fuxi_mme.data.prepared import build_prepared
    from fuxi_mme.data.splits import eval_arrays
    from fuxi_mme.eval.evaluator import evaluate_split, rank_split

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(0)
    rows = [(u, int(rng.integers(1, 12)), t) for u in range(37) for t in range(int(rng.integers(3, 9)))]
    ds, _ = build_prepared(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), "t")
    out = {}
    for mode in ("mask", "keep"):
        arrs = eval_arrays(ds, "loo-val", "test", max_len=5)
        table = np.round(np.random.default_rng(1).normal(size=(len(arrs), ds.num_items + 1)), 1)
        scorer = lambda b: torch.tensor(table[b.rows], dtype=torch.float32)
        def gather(obj):
            got = [None] * world
            dist.all_gather_object(got, obj)
            return got
        m = evaluate_split(scorer, arrs, ds, split="test", history=mode, ks=(1, 3), batch_size=4, rank=rank, world=world, gather=gather)
        one = evaluate_split(scorer, arrs, ds, split="test", history=mode, ks=(1, 3), batch_size=4)
        out[mode] = {"dist": m, "one": one}
    if rank == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_distributed_evaluation_equals_one_process_under_every_setting(tmp_path):
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
    for mode in ("mask", "keep"):
        assert out[mode]["dist"] == out[mode]["one"]
    assert out["mask"]["one"]["repeat_targets"]["masked"] > 0  # the fixture does repeat


def test_data_repeats_policies():
    df = pd.DataFrame({"user": [0, 0, 0, 0, 0, 1, 1, 1], "item": [5, 5, 6, 5, 6, 7, 8, 7], "timestamp": [1, 2, 3, 4, 5, 1, 2, 3]})
    kept, notes = apply_repeats(df, "keep", "stable")
    assert kept is df and notes == []
    dc, notes = apply_repeats(df, "drop-consecutive", "stable")
    assert dc[dc.user == 0]["item"].tolist() == [5, 6, 5, 6] and "1 consecutive" in notes[0]
    first, _ = apply_repeats(df, "first", "stable")
    assert first[first.user == 0]["item"].tolist() == [5, 6] and first[first.user == 1]["item"].tolist() == [7, 8]
    ds, _ = build_prepared(first, "t")
    assert not repeat_flags(ds).any()


def test_repeats_option_is_validated_and_keyed(tmp_path):
    from fuxi_mme.data import _key_parts

    cfg = apply_overrides(Config(), ["data.repeats=first"])
    validate(cfg)
    assert _key_parts(cfg.data, None)["repeats"] == "first"
    assert "repeats" not in _key_parts(Config().data, None)  # caches prepared before the option stay valid
    with pytest.raises(ConfigError, match="data.repeats"):
        validate(apply_overrides(Config(), ["data.repeats=sometimes"]))
    with pytest.raises(ConfigError, match="eval.history"):
        validate(apply_overrides(Config(), ["eval.history=partly"]))


def test_old_filter_history_values_still_load(caplog):
    d = Config().to_dict()
    d["eval"]["filter_history"] = False
    d["eval"].pop("history")
    assert config_from_dict(d).eval.history == "keep"
    d["eval"]["filter_history"] = True
    assert config_from_dict(d).eval.history == "mask"
    assert "deprecated" in caplog.text


def test_non_finite_scores_never_lift_a_target():
    scores = torch.tensor(
        [[-torch.inf, 0.5, float("nan"), 0.1, 0.2], [-torch.inf, float("nan"), 0.3, 0.1, 0.2], [-torch.inf, 0.5, torch.inf, 0.1, 0.2]]
    )
    ranks = ranks_from_scores(scores, torch.tensor([3, 1, 1]))
    # row 0: 0.5, 0.2 and the NaN outrank 0.1; row 1: the target's score is NaN: last (5
    # columns); row 2: +inf outranks 0.5
    assert ranks.tolist() == [4, 5, 2]


def test_a_nan_target_score_fails_the_evaluation_naming_the_split():
    ds = _repeat_fixture()
    arrs = eval_arrays(ds, "paper", "test", max_len=10)
    table = np.zeros((len(arrs), ds.num_items + 1))
    table[2, arrs.targets[2]] = np.nan
    with pytest.raises(NonFiniteScores, match=r"^test: 1 of 6 users"):
        evaluate_split(_table_scorer(table), arrs, ds, split="test", history="keep")
