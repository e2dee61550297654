"""Large-log paths (docs/performance.md#scale): windows gathered per batch instead of whole
(host memory independent of users x max_len), and the out-of-core columnar preparation."""

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
