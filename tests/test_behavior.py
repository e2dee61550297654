"""Behaviours (docs/datasets.md#behaviours): the data (demo, OTTO sessions, KuaiRand flags,
rating buckets), the target-behaviour protocols (leak-free), the models' behaviour input (off:
exactly the model without it) and serving with behaviours."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from fuxi_mme.config import Config, ConfigError, ModelConfig, validate
from fuxi_mme.data import DataError, load_dataset
from fuxi_mme.data.behaviors import attach_behavior, rating_buckets
from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.sources import kuairand_behavior
from fuxi_mme.data.splits import eval_arrays, split_points, train_arrays
from fuxi_mme.models import build_model


def _ds(rows, target=None):
    """A prepared dataset from (user, item, behaviour) rows in time order."""
    df = pd.DataFrame(rows, columns=["user", "item", "behavior"])
    df["timestamp"] = np.arange(len(df), dtype=np.int64) * 10
    ds, _ = build_prepared(df, "t")
    ds.target_behavior = target
    return ds


def _random_log(rng, users=30):
    rows = []
    for u in range(users):
        for _ in range(int(rng.integers(2, 25))):
            rows.append((u, int(rng.integers(1, 40)), str(rng.choice(["click", "cart", "order"], p=[0.6, 0.25, 0.15]))))
    return rows


@pytest.mark.parametrize("protocol", ["loo-val", "paper"])
@pytest.mark.parametrize("seed", range(5))
def test_target_behaviour_splits_are_leak_free(protocol, seed):
    """Held-out targets are each user's last (and second-to-last) target-behaviour events; the
    history is every event before the target; nothing at or after the first held-out target is
    trained on; the training loss only counts next events of the target behaviour."""
    ds = _ds(_random_log(np.random.default_rng(seed)), target="order")
    code = ds.behavior_names.index("order") + 1
    pts = split_points(ds, protocol)
    splits = ["valid", "test"] if protocol == "loo-val" else ["test"]
    for u in range(ds.num_users):
        s, e = ds.offsets[u], ds.offsets[u + 1]
        hits = s + np.flatnonzero(ds.behaviors[s:e] == code)
        if len(hits) >= len(splits):
            want = hits[-len(splits) :]
            assert [pts[k][u] for k in splits] == want.tolist()
            assert pts["train_end"][u] == want[0]  # training stops before the first held-out target
        else:
            assert all(pts[k][u] == -1 for k in splits) and pts["train_end"][u] == e
    for split in splits:
        ev = eval_arrays(ds, protocol, split, max_len=50)
        assert (ds.behaviors[ev.hist_end] == code).all()
        assert (ev.targets == ds.items[ev.hist_end]).all()
        for r in range(len(ev)):  # the history is every event before the target, all behaviours
            s = ev.hist_start[r]
            assert ev.ids[r, : ev.lengths[r]].tolist() == ds.items[s : ev.hist_end[r]][-50:].tolist()
            assert ev.behaviors[r, : ev.lengths[r]].tolist() == ds.behaviors[s : ev.hist_end[r]][-50:].tolist()
    # training: each user's window ends before its first held-out target, and only positions whose
    # next event is an "order" count
    tr = train_arrays(ds, protocol, max_len=50)
    want_rows = []
    for u in range(ds.num_users):
        s, te = ds.offsets[u], pts["train_end"][u]
        w = np.arange(max(s, te - 51), te)
        tgt = np.where(ds.behaviors[w[1:]] == code, ds.items[w[1:]], 0)
        if len(w) >= 2 and tgt.any():
            want_rows.append((ds.items[w[:-1]].tolist(), tgt.tolist()))
    got_rows = [(tr.ids[r, : tr.lengths[r]].tolist(), tr.targets[r, : tr.lengths[r]].tolist()) for r in range(len(tr))]
    assert got_rows == want_rows and len(got_rows) > 0


def test_training_targets_are_only_target_behaviour_events():
    rows = [(0, 1, "click"), (0, 2, "order"), (0, 3, "click"), (0, 4, "order"), (0, 5, "click"), (0, 6, "order"), (0, 7, "order")]
    ds = _ds(rows, target="order")
    tr = train_arrays(ds, "loo-val", max_len=10)
    # valid = item 6, test = item 7: training is items 1..5, targets only where the next is an order
    assert tr.ids[0, : tr.lengths[0]].tolist() == [1, 2, 3, 4]
    assert tr.targets[0, : tr.lengths[0]].tolist() == [2, 0, 4, 0]
    ds.target_behavior = None  # without a target behaviour: today's split
    tr = train_arrays(ds, "loo-val", max_len=10)
    assert tr.targets[0, : tr.lengths[0]].tolist() == [2, 3, 4, 5]


def test_a_target_behaviour_no_user_has_twice_is_a_one_line_error():
    ds = _ds([(0, 1, "click"), (0, 2, "order"), (1, 3, "click"), (1, 4, "click")], target="order")
    with pytest.raises(DataError) as e:
        split_points(ds, "loo-val")
    msg = str(e.value)
    assert "\n" not in msg and "no user has 2 'order'" in msg and "click 3, order 1" in msg and "data.target_behavior" in msg
    assert split_points(ds, "paper")["test"].tolist() == [1, -1]  # paper needs one


def test_unknown_target_behaviour_and_missing_values_name_the_value_and_fix(tmp_path):
    cfg = Config()
    cfg.data.demo_users = 50
    cfg.data.behavior = "auto"
    cfg.data.target_behavior = "cart"
    with pytest.raises(DataError, match=r"data.target_behavior='cart' is not a behaviour of this dataset; known: purchase, save, view"):
        load_dataset(cfg.data)
    df = pd.DataFrame({"user": [1, 1, 2], "item": [1, 2, 3], "timestamp": [1, 2, 3], "kind": ["a", None, "b"]})
    with pytest.raises(DataError, match=r"1 event\(s\) have no behaviour, first at data row 2 \(user 1, item 2\); fill them in"):
        attach_behavior(df, "kind", "f.csv")
    with pytest.raises(DataError, match="no rating column"):
        attach_behavior(df, "rating", "f.csv")
    with pytest.raises(DataError, match="has no behaviour column of its own"):
        attach_behavior(df.drop(columns="kind"), "auto", "f.csv")


def test_config_switches_need_behaviours_in_the_data():
    cfg = Config()
    cfg.model.use_behavior = True
    with pytest.raises(ConfigError, match="model.use_behavior needs behaviours in the data: set data.behavior=auto"):
        validate(cfg)
    cfg = Config()
    cfg.data.target_behavior = "order"
    with pytest.raises(ConfigError, match="data.target_behavior needs behaviours"):
        validate(cfg)
    cfg.data.behavior = "auto"
    validate(cfg)


def test_rating_buckets_and_kuairand_flags():
    assert rating_buckets(np.array([1, 2, 2.5, 3, 3.4, 4, 5])).tolist() == ["1-2", "1-2", "1-2", "3", "3", "4-5", "4-5"]
    df = pd.DataFrame({"user": [1, 1, 1, 2, 2], "item": [1, 2, 3, 1, 2], "timestamp": [1, 2, 3, 4, 5], "rating": [5.0, 1.0, 3.0, 4.0, 2.0]})
    ds, _ = build_prepared(attach_behavior(df, "rating", "r"), "r")
    assert ds.behavior_names == ["1-2", "3", "4-5"]  # star order, not alphabetical
    assert ds.behaviors.tolist() == [3, 1, 2, 3, 1]
    t = pd.DataFrame({"is_click": [0, 1, 1, 1], "is_like": [0, 0, 1, 0], "long_view": [0, 0, 0, 1]})
    assert kuairand_behavior(t).tolist() == ["view", "click", "like", "long_view"]


def test_demo_behaviours_keep_the_log_and_carry_signal():
    from fuxi_mme.data import demo

    df = demo.generate(200, 0)
    cat = demo.item_catalogue()
    assert set(df["behavior"]) == set(demo.BEHAVIORS)
    cfg = Config()
    cfg.data.demo_users = 200
    plain = load_dataset(cfg.data)
    cfg.data.behavior = "auto"
    with_b = load_dataset(cfg.data)
    assert plain.behaviors is None and plain.cache_dir != with_b.cache_dir
    assert np.array_equal(plain.items, with_b.items) and np.array_equal(plain.timestamps, with_b.timestamps)
    # a save says the series goes on: P(next = next part | save) >> P(next = next part | view)
    nxt_same_user = np.append(df["user"].to_numpy()[1:] == df["user"].to_numpy()[:-1], False)
    nxt = np.append(df["item"].to_numpy()[1:], 0)
    goes_on = nxt_same_user & (nxt == df["item"].to_numpy() + 1) & (cat["part"].to_numpy()[df["item"].to_numpy() - 1] < demo.SERIES_LEN - 1)
    b = df["behavior"].to_numpy()
    assert goes_on[b == "save"].mean() > 0.6 > 0.2 > goes_on[b == "view"].mean()


def test_otto_sessions_carry_their_types(tmp_path):
    lines = [
        {"session": 1, "events": [{"aid": 10, "ts": 1_659_304_800_000, "type": "clicks"}, {"aid": 11, "ts": 1_659_304_900_000, "type": "carts"}]},
        {"session": 2, "events": [{"aid": 10, "ts": 1_659_305_000_000, "type": "clicks"}, {"aid": 12, "ts": 1_659_305_100_000, "type": "orders"}]},
    ]
    f = tmp_path / "otto.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = Config()
    cfg.data.name, cfg.data.path, cfg.data.behavior = "file", str(f), "auto"
    ds = load_dataset(cfg.data)
    assert ds.behavior_names == ["carts", "clicks", "orders"]
    assert [ds.behavior_names[c - 1] for c in ds.behaviors] == ["clicks", "carts", "clicks", "orders"]
    assert ds.stats["behaviors"] == {"carts": 1, "clicks": 2, "orders": 1}


def test_the_bundled_otto_sample_trains_on_carts_with_its_types():
    """The real OTTO sample (tests/data/README.md: CC BY 4.0, Normann, Baumeister and Wilm 2023)."""
    from pathlib import Path

    from fuxi_mme.train.run import train

    f = Path(__file__).parent / "data" / "otto_sample.jsonl"
    cfg = Config()
    cfg.data.name, cfg.data.path, cfg.data.behavior = "file", str(f), "auto"
    ds = load_dataset(cfg.data)
    assert ds.num_users == 20 and ds.stats["behaviors"] == {"carts": 52, "clicks": 800, "orders": 10}
    cfg.data.target_behavior = "carts"
    ds = load_dataset(cfg.data)
    test = eval_arrays(ds, "loo-val", "test", 50)
    assert len(test) == 4 and (ds.behaviors[test.hist_end] == ds.behavior_names.index("carts") + 1).all()
    run = tiny_config("fuxi-alpha", **{"data.name": "file", "data.path": str(f), "data.behavior": "auto", "data.target_behavior": "carts"})
    run.model.use_behavior, run.train.epochs, run.log.run_dir = True, 1, str(Path(ds.cache_dir).parent / "otto-run")
    train(run)
    m = json.loads((Path(run.log.run_dir) / "metrics.json").read_text())
    assert "test" in m


@pytest.mark.parametrize("name", ["fuxi-alpha", "fuxi-mme", "hstu", "sasrec", "llama"])
def test_behaviour_input_off_is_todays_model_and_on_adds_only_the_table(name):
    cfg = tiny_config(name).model
    torch.manual_seed(0)
    off = build_model(cfg, 30, 12).eval()
    assert not any("behavior" in k for k in off.state_dict())
    on_cfg = ModelConfig(**{**cfg.__dict__, "use_behavior": True})
    if name == "fuxi-mme":
        on_cfg.num_embeddings = 2
        cfg.num_embeddings = 2
        torch.manual_seed(0)
        off = build_model(cfg, 30, 12).eval()
    on = build_model(on_cfg, 30, 12).eval()
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra and all("behavior_emb" in k for k in extra) and set(off.state_dict()) <= set(on.state_dict())
    ids = torch.tensor([[3, 5, 7, 0], [1, 2, 0, 0]])
    ts = torch.tensor([[10, 20, 30, 0], [5, 600, 0, 0]])
    qts = torch.tensor([[20, 30, 40, 0], [600, 700, 0, 0]])
    beh = torch.tensor([[1, 2, 3, 0], [3, 3, 0, 0]])
    # off: behaviours are ignored
    assert torch.equal(off(ids, ts, qts), off(ids, ts, qts, beh))
    # on, with the other weights of the off model and a zero behaviour table: the same outputs
    on.load_state_dict({**on.state_dict(), **off.state_dict()})
    with torch.no_grad():
        for k, p in on.named_parameters():
            if "behavior_emb" in k:
                p.zero_()
    assert torch.allclose(on(ids, ts, qts, beh), off(ids, ts, qts), atol=1e-6)
    with torch.no_grad():
        for k, p in on.named_parameters():
            if "behavior_emb" in k:
                p.normal_()
    out = on(ids, ts, qts, beh)
    assert not torch.allclose(out, off(ids, ts, qts), atol=1e-3)
    assert torch.allclose(out[0, 0], on(ids[:, :1], ts[:, :1], qts[:, :1], beh[:, :1])[0, 0], atol=1e-5)  # still causal


def test_ssm_refuses_the_behaviour_input():
    cfg = Config()
    cfg.data.behavior, cfg.model.use_behavior, cfg.model.name = "auto", True, "ssm"
    with pytest.raises(ConfigError, match="not supported by model 'ssm'"):
        validate(cfg)


@pytest.fixture(scope="module")
def behavior_runs(tmp_path_factory):
    import os

    from fuxi_mme.train.run import train

    root = tmp_path_factory.mktemp("behavior")
    os.environ["FUXI_MME_DATA"] = str(root / "cache")
    over = {"train.epochs": 1, "data.behavior": "auto", "data.target_behavior": "purchase"}
    train(tiny_config("fuxi-mme", **over, **{"model.use_behavior": True, "model.num_embeddings": 2, "log.run_dir": str(root / "on")}))
    train(tiny_config("fuxi-alpha", **over, **{"log.run_dir": str(root / "off")}))
    return root


def test_training_with_behaviours_writes_target_behaviour_metrics(behavior_runs):
    for run in ("on", "off"):
        m = json.loads((behavior_runs / run / "metrics.json").read_text())
        assert 0 < m["test"]["count"] <= 200 if "count" in m.get("test", {}) else True
        cfg = json.loads((behavior_runs / run / "config.json").read_text())
        assert cfg["data"]["target_behavior"] == "purchase"


def test_serving_accepts_pairs_and_lists_and_refuses_bad_behaviours(behavior_runs):
    from fuxi_mme.serve import Query, Recommender
    from fuxi_mme.serve.recommender import RequestError

    rec = Recommender.from_run(behavior_runs / "on", device="cpu")
    q = rec.history_of(rec.ds.user_raw[0])
    assert q.behaviors and set(q.behaviors) <= {"view", "save", "purchase"}
    as_list = rec.recommend([Query(q.history, q.timestamps, k=5, behaviors=q.behaviors)])[0]
    as_pairs = rec.recommend([Query([[i, b] for i, b in zip(q.history, q.behaviors)], q.timestamps, k=5)])[0]
    assert as_list == as_pairs
    other = rec.recommend([Query(q.history, q.timestamps, k=5, behaviors=["purchase"] * len(q.history))])[0]
    assert [x["score"] for x in other["items"]] != [x["score"] for x in as_list["items"]]
    plain = rec.recommend([Query(q.history, q.timestamps, k=5)])[0]
    assert any("no behaviours given" in n for n in plain["notes"])
    with pytest.raises(RequestError, match=r"behaviour 'cart' of history\[1\] is not one this model knows; known: purchase, save, view"):
        rec.recommend([Query([q.history[0], q.history[1]], k=5, behaviors=["view", "cart"])])
    with pytest.raises(RequestError, match="behaviors has 1 values but history has 2"):
        rec.recommend([Query(q.history[:2], k=5, behaviors=["view"])])
    off = Recommender.from_run(behavior_runs / "off", device="cpu")
    with pytest.raises(RequestError, match=r"trained without behaviours \(model.use_behavior=false\)"):
        off.recommend([Query([[q.history[0], "view"]], k=5)])
    assert off.history_of(off.ds.user_raw[0]).behaviors is None
