import json

import numpy as np
import pandas as pd
import pytest

from fuxi_mme.config import DataConfig
from fuxi_mme.data import DataError, demo, load_dataset
from fuxi_mme.data.batches import make_batch
from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.splits import eval_arrays, train_arrays
from fuxi_mme.data.table import load_user_file


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_file_formats(tmp_path):
    df = pd.DataFrame({"u": [1, 1, 2, 2], "i": ["a", "b", "a", "c"], "t": [10, 20, 5, 6]})
    df.to_parquet(tmp_path / "x.parquet")
    df.to_json(tmp_path / "x.jsonl", orient="records", lines=True)
    df.to_csv(tmp_path / "x.csv", index=False)
    df.to_csv(tmp_path / "x.tsv", index=False, sep="\t")
    for f in ("x.parquet", "x.jsonl", "x.csv", "x.tsv"):
        out = load_user_file(tmp_path / f, "u", "i", "t")
        assert out["item"].tolist() == ["a", "b", "a", "c"] and out["timestamp"].tolist() == [10, 20, 5, 6], f


@pytest.mark.parametrize(
    "text, kwargs, needle",
    [
        ("user,item,timestamp\n", {}, "holds no interactions"),
        ("user,itm,timestamp\n1,2,3\n", {}, "no column 'item'"),
        ("user,item,timestamp\n1,2,3\n,3,4\n", {}, "line 3 has no user id \\(column 'user' is empty\\)"),
        ("user,item,timestamp\n1,2,3\n1,,4\n", {}, "line 3 has no item id"),
        ("user,item,timestamp\n1,2,3\n1,3,yesterday\n", {}, "line 3: timestamp 'yesterday' in column 'timestamp' is not a unix time"),
        ("user,item,timestamp\n1,2,3\n1,3,-4\n", {}, "line 3: timestamp '-4' in column 'timestamp' is not a unix time >= 0"),
    ],
)
def test_bad_user_files_get_clear_errors(tmp_path, text, kwargs, needle):
    p = write(tmp_path, "bad.csv", text)
    with pytest.raises(DataError, match=needle) as e:
        load_dataset(DataConfig(name="file", path=str(p)))
    assert "bad.csv" in str(e.value) and "\n" not in str(e.value)


def test_a_semicolon_table_is_detected(tmp_path):
    p = write(tmp_path, "semi.csv", "user;item;timestamp\n1;2;3\n1;3;4\n")
    ds = load_dataset(DataConfig(name="file", path=str(p), data_dir=str(tmp_path / "c")))
    assert ds.stats["interactions"] == 2 and ds.has_timestamps


def test_missing_file_and_all_users_too_short(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(name="file", path=str(tmp_path / "nope.csv")))
    p = write(tmp_path, "short.csv", "user,item,timestamp\n1,2,3\n2,3,4\n")
    with pytest.raises(DataError, match="no user has at least 2 interactions"):
        load_dataset(DataConfig(name="file", path=str(p)))


def test_short_users_are_dropped_and_counted(tmp_path, caplog):
    p = write(tmp_path, "d.csv", "user,item,timestamp\n1,2,3\n1,3,4\n2,3,4\n3,1,1\n")
    ds = load_dataset(DataConfig(name="file", path=str(p)))
    assert ds.num_users == 1
    assert any("dropped 2 user(s) with fewer than 2 interactions" in n for n in ds.stats["notes"])


def test_stable_order_keeps_file_order_on_ties_and_ids_are_contiguous():
    df = pd.DataFrame({"user": [7, 7, 7, 7, 3, 3], "item": [30, 10, 20, 99, 10, 30], "timestamp": [5, 5, 5, 1, 2, 1]})
    ds, _ = build_prepared(df, "t")
    assert ds.item_raw[1:].tolist() == [10, 20, 30, 99]  # sorted raw ids -> 1..I, 0 = padding
    assert ds.user_raw.tolist() == [3, 7]
    seqs = [ds.item_raw[ds.sequence(u)[0]].tolist() for u in range(ds.num_users)]
    assert seqs == [[30, 10], [99, 30, 10, 20]]  # ties (t=5) keep file order


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    p = write(tmp_path, "d.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")
    cfg = DataConfig(name="file", path=str(p))
    a = load_dataset(cfg)
    b = load_dataset(cfg)
    assert a.cache_dir == b.cache_dir
    meta = json.loads((tmp_path / "cache" / "prepared").joinpath(a.cache_dir.split("/")[-1], "meta.json").read_text())
    assert meta["stats"]["interactions"] == 2
    p.write_text("user,item,timestamp\n1,2,3\n1,3,4\n1,4,5\n")
    c = load_dataset(cfg)
    assert c.cache_dir != a.cache_dir and c.stats["interactions"] == 3
    # no temporary folders left behind
    assert not [x for x in (tmp_path / "cache" / "prepared").iterdir() if ".tmp-" in x.name]


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    import fuxi_mme.data.prepared as prep

    p = write(tmp_path, "d.csv", "user,item,timestamp\n1,2,3\n1,3,4\n")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(prep.np, "savez", boom)
    with pytest.raises(OSError):
        load_dataset(DataConfig(name="file", path=str(p)))
    root = tmp_path / "cache" / "prepared"
    assert not root.exists() or list(root.iterdir()) == []


def small_ds():
    # user 0: items 1..6 at t = 10, 20, ..., 60
    df = pd.DataFrame({"user": [0] * 6 + [1] * 3, "item": [1, 2, 3, 4, 5, 6, 3, 2, 1], "timestamp": [10, 20, 30, 40, 50, 60, 1, 2, 3]})
    return build_prepared(df, "t")[0]


def test_paper_and_loo_val_splits():
    ds = small_ds()
    tr = train_arrays(ds, "paper", max_len=10)
    assert tr.ids[0, :5].tolist() == [1, 2, 3, 4, 5] and tr.targets[0, :4].tolist() == [2, 3, 4, 5]
    assert tr.ids[0, 4] == 5 and tr.targets[0, 4] == 0  # the test item 6 is never a training target
    te = eval_arrays(ds, "paper", "test", 10)
    assert te.targets.tolist() == [6, 1] and te.lengths.tolist() == [5, 2]
    tr = train_arrays(ds, "loo-val", max_len=10)
    assert tr.targets[0].max() == 4  # items 5 (valid) and 6 (test) are held out
    va = eval_arrays(ds, "loo-val", "valid", 10)
    assert va.targets.tolist() == [5, 2] and va.lengths.tolist() == [4, 1]
    te = eval_arrays(ds, "loo-val", "test", 10)
    assert te.targets.tolist() == [6, 1] and te.lengths.tolist() == [5, 2]


def test_windows_keep_the_most_recent_items_and_query_time_is_the_target_time():
    ds = small_ds()
    te = eval_arrays(ds, "paper", "test", max_len=3)
    assert te.ids[0].tolist() == [3, 4, 5] and te.ts[0].tolist() == [30, 40, 50]
    assert te.query_ts[0].tolist() == [40, 50, 60]  # position i sees the time of the item after it
    tr = train_arrays(ds, "paper", max_len=3)
    assert tr.ids[0].tolist() == [2, 3, 4] and tr.targets[0].tolist() == [3, 4, 5]
    assert tr.query_ts[0].tolist() == [30, 40, 50]
    b = make_batch(te, np.array([1]))
    assert b.ids.shape == (1, 2)  # trimmed to the longest row
    assert b.target.tolist() == [1] and b.positions is None  # an evaluation batch: no training positions
    assert b.targets.tolist() == [[2, 1]]  # the history's next item, then the held-out target


def test_demo_is_deterministic_and_carries_signal():
    a, b = demo.generate(300, seed=1), demo.generate(300, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert not demo.generate(300, seed=2).equals(a)
    assert (a.groupby("user")["timestamp"].apply(lambda s: s.is_monotonic_increasing)).all()
    cat = demo.item_catalogue().set_index("item")
    # consecutive items share the genre far more often than chance (1/8)
    nxt = a.groupby("user")["item"].shift(-1)
    ok = nxt.notna()
    same = (cat.loc[a.loc[ok, "item"], "genre"].to_numpy() == cat.loc[nxt[ok].astype(int), "genre"].to_numpy()).mean()
    assert same > 0.5
