"""Large-log paths (docs/performance.md#scale): windows gathered per batch instead of whole
(host memory independent of users x max_len), and the out-of-core columnar preparation."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fuxi_mme.data.batches import make_batch
from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.splits import LazyRows, eval_arrays, train_arrays


def _log(seed, users=40, behaviors=False):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for _ in range(int(rng.integers(1, 30))):
            rows.append((u, int(rng.integers(1, 60)), int(rng.integers(0, 1000)), str(rng.choice(["click", "cart", "order"], p=[0.6, 0.25, 0.15]))))
    df = pd.DataFrame(rows, columns=["user", "item", "timestamp", "behavior"])
    return df if behaviors else df.drop(columns="behavior")


@pytest.mark.parametrize("protocol", ["loo-val", "paper"])
@pytest.mark.parametrize("target", [None, "order"])
@pytest.mark.parametrize("max_len", [3, 8, 40])
def test_lazy_windows_equal_the_dense_ones(protocol, target, max_len):
    ds, _ = build_prepared(_log(max_len, behaviors=True), "t")
    ds.target_behavior = target
    dense, lazy = train_arrays(ds, protocol, max_len), train_arrays(ds, protocol, max_len, dense_limit=0)
    assert isinstance(lazy.ids, LazyRows) and isinstance(dense.ids, np.ndarray)
    assert np.array_equal(dense.lengths, lazy.lengths)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(dense))[:17]
    for name in ("ids", "ts", "targets", "query_ts", "behaviors"):
        d, lz = getattr(dense, name), getattr(lazy, name)
        assert np.array_equal(d, np.asarray(lz)), name
        for n in (1, max_len // 2 + 1, max_len):
            assert np.array_equal(d[rows, :n], lz[rows, :n]), (name, n)
        assert np.array_equal(d[3], lz[3]) and np.array_equal(d[2:9], lz[2:9])
        # the same rows as another index dtype, then other rows of equal bytes: each gathered right
        assert np.array_equal(d[rows[:2], :4], lz[rows[:2].astype(np.int32), :4]), name
        one = np.array([rows[0]], dtype=np.int64)
        two = np.frombuffer(one.tobytes(), dtype=np.int32).copy()  # rows [r, 0]: the same bytes
        assert np.array_equal(d[one, :4], lz[one, :4]) and np.array_equal(d[two, :4], lz[two, :4]), name
    fields = [getattr(lazy, f)[rows, :5] for f in ("ids", "ts", "targets", "query_ts")]
    fields[1][:] = -7  # each field is its own array: writing one leaves the others (and the next read) alone
    assert (fields[3] != -7).all() and np.array_equal(lazy.ts[rows, :5], dense.ts[rows, :5])
    for a, b in ((make_batch(dense, rows), make_batch(lazy, rows)),):
        for f in ("ids", "ts", "query_ts", "lengths", "targets", "positions", "pos_targets", "behaviors"):
            assert np.array_equal(getattr(a, f).numpy(), getattr(b, f).numpy()), f
    for split in ("test",) + (("valid",) if protocol == "loo-val" else ()):
        de, le = eval_arrays(ds, protocol, split, max_len), eval_arrays(ds, protocol, split, max_len, dense_limit=0)
        assert isinstance(le.query_ts, LazyRows)
        for name in ("users", "lengths", "targets", "hist_start", "hist_end", "ids", "ts", "query_ts", "behaviors"):
            assert np.array_equal(getattr(de, name), np.asarray(getattr(le, name))), (split, name)
        r = np.arange(len(de))[::3]
        for n in (1, 2, max_len):
            assert np.array_equal(de.query_ts[r, :n], le.query_ts[r, :n]), (split, n)
        a, b = make_batch(de, r), make_batch(le, r)
        for f in ("ids", "ts", "query_ts", "lengths", "targets"):
            assert np.array_equal(getattr(a, f).numpy(), getattr(b, f).numpy()), f


@pytest.mark.parametrize("model", ["fuxi-alpha", "fuxi-mme"])
def test_training_on_lazy_windows_gives_the_same_run(tmp_path, monkeypatch, model):
    """The trainer and the evaluator read only rows of the split matrices: a run whose
    matrices are gathered per batch equals the run that built them whole."""
    import fuxi_mme.data.splits as splits
    from conftest import tiny_config
    from fuxi_mme.train.run import train

    def run(limit, sub):
        monkeypatch.setattr(splits, "DENSE_LIMIT", limit)
        monkeypatch.setattr(splits.train_arrays, "__defaults__", (limit,))
        monkeypatch.setattr(splits.eval_arrays, "__defaults__", (limit,))
        cfg = tiny_config(model, **{"train.epochs": 1, "log.run_dir": str(tmp_path / sub), "data.data_dir": str(tmp_path / "d")})
        return train(cfg)

    dense, lazy = run(1 << 27, "dense"), run(0, "lazy")
    assert dense["test"] == lazy["test"] and dense["valid_best"] == lazy["valid_best"]


# --------------------------------------------------------------------------- columnar engine


def _parquet_log(tmp_path, seed=0, rows=20_000, users=900, items=700, scale=(1, 1), parts=1, dup_share=0.02, times=True):
    """A log with exact duplicates, users with one event, tied timestamps and item ids only
    short users have; ``scale`` spreads the raw ids (a sparse id range); ``parts`` > 1 writes a
    folder of Parquet parts."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, rows) * scale[0] + 11
    i = rng.integers(0, items, rows) * scale[1] + 3
    t = rng.integers(0, rows // 4, rows)
    dup = rng.random(rows) < dup_share
    u[1:][dup[1:]], i[1:][dup[1:]], t[1:][dup[1:]] = u[:-1][dup[1:]], i[:-1][dup[1:]], t[:-1][dup[1:]]
    u = np.concatenate([u, [10**6 * scale[0] + 1]])  # a user with one event, holding an item nobody else has
    i = np.concatenate([i, [10**6 * scale[1] + 7]])
    t = np.concatenate([t, [5]])
    df = pd.DataFrame({"uid": u, "iid": i, "ts": t} if times else {"uid": u, "iid": i})
    if parts == 1:
        path = tmp_path / "log.parquet"
        df.to_parquet(path)
    else:
        path = tmp_path / "log"
        path.mkdir()
        for k, chunk in enumerate(np.array_split(np.arange(len(df)), parts)):
            df.iloc[chunk].to_parquet(path / f"part-{k:03d}.parquet")
        (path / "_SUCCESS").write_text("")
    return path


def _both(tmp_path, path, part_events, batch_rows, **over):
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import columnar, load_dataset

    cfg = {**dict(name="file", path=str(path), user_col="uid", item_col="iid", time_col="ts", duplicates="drop"), **over}
    mem = load_dataset(DataConfig(**cfg, engine="memory", data_dir=str(tmp_path / "m")))
    old = columnar.PART_EVENTS, columnar.BATCH_ROWS
    columnar.PART_EVENTS, columnar.BATCH_ROWS = part_events, batch_rows
    try:
        col = load_dataset(DataConfig(**cfg, engine="columnar", data_dir=str(tmp_path / "c")))
    finally:
        columnar.PART_EVENTS, columnar.BATCH_ROWS = old
    return mem, col


@pytest.mark.parametrize(
    "scale, parts, part_events, batch_rows, over",
    [
        ((1, 1), 1, 1 << 26, 1 << 22, {}),  # one partition, one batch
        ((1, 1), 3, 997, 1500, {}),  # many partitions and batches, a folder of parts
        ((10**6, 10**7), 2, 4000, 3000, {}),  # sparse id ranges (sorted uniques, not bitmaps)
        ((1, 1), 1, 2000, 5000, {"min_user_interactions": 25}),
        ((1, 1), 1, 2000, 5000, {"duplicates": "keep"}),
        ((1, 1), 1, 2000, 5000, {"time_col": None}),
    ],
)
def test_columnar_preparation_equals_the_in_memory_one(tmp_path, scale, parts, part_events, batch_rows, over):
    from fuxi_mme.data import columnar
    from fuxi_mme.data.repeats import repeat_flags

    path = _parquet_log(tmp_path, scale=scale, parts=parts, times=over.get("time_col", "ts") is not None)
    mem, col = _both(tmp_path, path, part_events, batch_rows, **over)
    assert columnar.is_columnar(tmp_path / "c" / "prepared" / f"file-{Path(col.cache_dir).name.split('-')[-1]}")
    assert isinstance(col.items, np.memmap) and col.items.dtype == np.int32
    meta = json.loads((Path(col.cache_dir) / "meta.json").read_text())
    assert (meta["partitions"] > 1) == (part_events < 20_000)  # the small settings did split the log
    for f in ("offsets", "items", "timestamps", "item_raw", "user_raw"):
        assert np.array_equal(np.asarray(getattr(mem, f)), np.asarray(getattr(col, f))), f
    assert np.array_equal(repeat_flags(mem), np.asarray(repeat_flags(col)))
    strip = lambda st: {k: v for k, v in st.items() if k != "notes"}  # noqa: E731
    assert strip(mem.stats) == strip(col.stats)
    assert [n for n in mem.stats["notes"] if "dropped" in n] == col.stats["notes"]
    for protocol in ("loo-val", "paper"):  # and the splits read it the same
        a, b = eval_arrays(mem, protocol, "test", 7), eval_arrays(col, protocol, "test", 7)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.targets, b.targets) and a.targets.dtype == b.targets.dtype


def test_columnar_cache_is_reused_and_damage_rebuilds_it(tmp_path, caplog):
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import load_dataset

    path = _parquet_log(tmp_path)
    cfg = DataConfig(
        name="file", path=str(path), user_col="uid", item_col="iid", time_col="ts", duplicates="drop", engine="columnar", data_dir=str(tmp_path / "c")
    )
    a = load_dataset(cfg)
    folder = Path(a.cache_dir)
    stamp = (folder / "items.int32").stat().st_mtime_ns
    b = load_dataset(cfg)
    assert (folder / "items.int32").stat().st_mtime_ns == stamp and np.array_equal(a.items, b.items)
    with open(folder / "items.int32", "ab") as f:  # a truncated or extended array: rebuilt
        f.write(b"\0\0\0\0")
    c = load_dataset(cfg)
    assert "unreadable" in caplog.text and np.array_equal(np.asarray(a.items), np.asarray(c.items))
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"duplicates": "error"}, "repeat an earlier (user, item, timestamp) exactly"),
        ({"ordering": "hstu"}, "data.engine=columnar does not implement data.ordering=hstu; use data.engine=memory"),
        ({"item_col": "nope"}, "has no column 'nope' for the item"),
        ({"user_col": "name"}, "data.engine=columnar needs integer ids"),
        ({"time_col": "when"}, "timestamp column 'when' is empty in 1 row"),
    ],
)
def test_columnar_bad_input_is_one_line_and_leaves_no_cache(tmp_path, over, needle):
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import DataError, load_dataset

    path = _parquet_log(tmp_path, rows=500)
    df = pd.read_parquet(path)
    df["name"] = "u" + df["uid"].astype(str)
    df["when"] = df["ts"].where(df.index != 7)
    df.to_parquet(path)
    cfg = dict(name="file", path=str(path), user_col="uid", item_col="iid", time_col="ts", engine="columnar", data_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(**{**cfg, **over}))
    assert needle in str(err.value) and "\n" not in str(err.value)
    prepared = tmp_path / "c" / "prepared"
    assert not prepared.exists() or not list(prepared.iterdir())


def test_columnar_needs_parquet_and_auto_keeps_small_files_in_memory(tmp_path):
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import DataError, columnar, load_dataset

    csv = tmp_path / "log.csv"
    pd.read_parquet(_parquet_log(tmp_path, rows=300)).to_csv(csv, index=False)
    with pytest.raises(DataError, match="data.engine=columnar reads Parquet"):
        load_dataset(
            DataConfig(name="file", path=str(csv), user_col="uid", item_col="iid", time_col="ts", engine="columnar", data_dir=str(tmp_path / "c"))
        )
    auto = DataConfig(name="file", path=str(tmp_path / "log.parquet"), user_col="uid", item_col="iid", time_col="ts", duplicates="drop")
    assert not columnar.choose(auto, tmp_path / "log.parquet")  # 301 rows: in memory
    assert not columnar.choose(DataConfig(**{**auto.__dict__, "behavior": "rating"}), tmp_path / "log.parquet")


def test_evaluation_batches_shrink_for_huge_catalogues_and_ranks_do_not_change(monkeypatch):
    """Scores of one evaluation batch stay under SCORE_CELLS (1e7 items: 107 users, not 1024);
    the ranks do not depend on the batch size."""
    import torch

    from fuxi_mme.eval import evaluator

    assert evaluator.score_batch(1024, 26_744) == 1024 and evaluator.score_batch(1024, 10_000_000) == 107
    ds, _ = build_prepared(_log(3, users=60), "t")
    arrs = eval_arrays(ds, "loo-val", "test", 8)
    table = torch.randn(ds.num_users, ds.num_items + 1, generator=torch.Generator().manual_seed(0))
    scorer = lambda b: table[torch.from_numpy(arrs.users[b.rows])]  # noqa: E731
    whole = evaluator.rank_split(scorer, arrs, ds, "mask", 1024).ranks
    monkeypatch.setattr(evaluator, "SCORE_CELLS", 7 * (ds.num_items + 1))  # 7 users per batch
    assert evaluator.score_batch(1024, ds.num_items) == 7
    assert np.array_equal(whole, evaluator.rank_split(scorer, arrs, ds, "mask", 1024).ranks)


def test_length_chunks_of_a_batch_normalise_the_item_table_once():
    """Each length chunk used to normalise the whole item table (O(items) per chunk: 14 s a
    step at 330k items on 2 cores); the chunks of a batch now share one item table."""
    import torch

    from conftest import tiny_config
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.train.loop import Trainer

    cfg = tiny_config("fuxi-alpha", **{"train.length_chunks": 4, "train.batch_size": 64})
    ds = load_dataset(cfg.data)
    model = build_model(cfg.model, ds.num_items, cfg.data.max_len)
    tr = Trainer(cfg, ds, model, torch.device("cpu"), None, progress=False)
    calls = []
    real = model.item_vectors
    model.item_vectors = lambda: calls.append(1) or real()  # type: ignore[method-assign]
    tr.forward_backward(tr._epoch_order(0)[:64])
    assert tr.length_chunks == 4 and len(calls) == 1


@pytest.mark.parametrize("duplicates", ["drop", "error"])
def test_columnar_sort_in_worker_processes_equals_the_serial_pass(tmp_path, monkeypatch, duplicates):
    """Pass 4 in two spawned processes writes the same cache, byte for byte, as in one process;
    a duplicate found in a worker is the same one-line error, with no cache left behind."""
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import DataError, columnar, load_dataset

    path = _parquet_log(tmp_path, parts=2)
    monkeypatch.setattr(columnar, "PART_EVENTS", 997)
    cfg = dict(name="file", path=str(path), user_col="uid", item_col="iid", time_col="ts", duplicates=duplicates, engine="columnar")
    caches = []
    for workers in ("1", "2"):
        monkeypatch.setenv("FUXI_MME_PREPARE_WORKERS", workers)
        if duplicates == "error":
            with pytest.raises(DataError) as err:
                load_dataset(DataConfig(**cfg, data_dir=str(tmp_path / workers)))
            caches.append(str(err.value))
            assert not list((tmp_path / workers / "prepared").iterdir())
            continue
        folder = Path(load_dataset(DataConfig(**cfg, data_dir=str(tmp_path / workers))).cache_dir)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["partitions"] > 2 and meta["sort_workers"] == int(workers)
        caches.append({f.name: f.read_bytes() for f in folder.iterdir() if f.suffix not in (".json",)})
        caches.append({k: v for k, v in meta.items() if k not in ("prepare", "sort_workers")})
    if duplicates == "error":
        assert caches[0] == caches[1] and "repeat an earlier" in caches[0] and "\n" not in caches[0]
    else:
        assert caches[0] == caches[2] and caches[1] == caches[3]


def test_sort_workers_setting_is_checked(monkeypatch):
    from fuxi_mme.data import DataError, columnar

    monkeypatch.setenv("FUXI_MME_PREPARE_WORKERS", "4")
    assert columnar.sort_workers(3) == 3 and columnar.sort_workers(9) == 4
    monkeypatch.setenv("FUXI_MME_PREPARE_WORKERS", "many")
    with pytest.raises(DataError, match="FUXI_MME_PREPARE_WORKERS='many' is not a whole number"):
        columnar.sort_workers(3)
    monkeypatch.delenv("FUXI_MME_PREPARE_WORKERS")
    assert 1 <= columnar.sort_workers(3) <= 3


def test_millisecond_times_are_read_as_seconds_by_both_engines_and_the_service(tmp_path):
    """Unix times in milliseconds (above 1e11) become seconds in preparation, in-memory and
    columnar alike, with a note; the service reads a request's milliseconds by the same rule,
    so a model trained on such a log gets the times it trained on."""
    from fuxi_mme.data.table import millis_to_seconds

    path = _parquet_log(tmp_path, rows=3000)
    df = pd.read_parquet(path)
    df["ts"] = df["ts"] * 1000 + 1_600_000_000_000
    df.to_parquet(path)
    mem, col = _both(tmp_path, path, 1 << 26, 1 << 22)
    assert np.asarray(mem.timestamps).max() < 1e11 and np.array_equal(np.asarray(mem.timestamps), np.asarray(col.timestamps))
    assert np.asarray(mem.timestamps).min() >= 1_600_000_000
    for ds in (mem, col):
        assert any("milliseconds; converted to seconds" in n for n in ds.stats["notes"])
    secs, n = millis_to_seconds(np.array([1_700_000_000, 1_700_000_000_123]))
    assert secs.tolist() == [1_700_000_000, 1_700_000_000] and n == 1
