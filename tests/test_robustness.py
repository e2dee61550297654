"""Robustness protocols (data.noise, data.sparsity), history-length buckets and model.denoise
(docs/training.md#robustness-protocols, docs/models.md#noise-decoupling)."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from fuxi_mme.config import Config, ConfigError, ModelConfig, NoiseConfig, SparsityConfig, apply_overrides, validate
from fuxi_mme.data.noise import evaluation_view, perturb, training_view
from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.splits import eval_arrays, split_points, train_arrays
from fuxi_mme.eval.buckets import BUCKET_NAMES, bucket_metrics, history_buckets
from fuxi_mme.eval.evaluator import evaluate_split
from fuxi_mme.eval.metrics import metrics_from_ranks
from fuxi_mme.models.denoise import FrequencyFilter
from fuxi_mme.models.fuxi_alpha import FuxiAlpha
from fuxi_mme.models.fuxi_mme import FuxiMME

NOISES = [NoiseConfig("insert", 0.3), NoiseConfig("replace", 0.3, "popularity"), NoiseConfig("shuffle", 0.6, window=3)]
SPARSITIES = [SparsityConfig(), SparsityConfig("last_k", k=3), SparsityConfig("drop", rate=0.4)]


def _dataset(users=60, held_out_items=True):
    """Users with 3..30 events; under loo-val each user's last two events are items 101.. that no
    training part holds (so a leak would show)."""
    rng = np.random.default_rng(0)
    rows, t = [], 0
    for u in range(users):
        n = int(rng.integers(3, 31))
        for i in range(n):
            t += 1
            item = 100 + 2 * u + (i - n + 3) if held_out_items and i >= n - 2 else int(rng.integers(1, 40))
            rows.append((u, item, t))
    return build_prepared(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), "t")[0]


def _heldout_ids(ds):
    return set(np.unique(ds.items[np.concatenate([split_points(ds, "loo-val")[s] for s in ("valid", "test")])]).tolist())


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.kind)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: s.kind)
def test_perturbation_is_deterministic_per_seed_and_keeps_targets_out_of_training(noise, sparsity):
    ds = _dataset()
    a, b, c = (perturb(ds, "loo-val", noise, sparsity, seed) for seed in (1, 1, 2))
    assert np.array_equal(a.items, b.items) and np.array_equal(a.offsets, b.offsets) and np.array_equal(a.timestamps, b.timestamps)
    assert not (len(a.items) == len(c.items) and np.array_equal(a.items, c.items))  # another seed, other noise
    for split in ("valid", "test"):  # the same held-out events (sparsity may empty a history: evaluation reads the clean one)
        clean, got = split_points(ds, "loo-val")[split], split_points(a, "loo-val")[split]
        assert np.array_equal(ds.items[clean], a.items[got]) and np.array_equal(ds.timestamps[clean], a.timestamps[got])
        if sparsity.kind == "none":
            assert np.array_equal(eval_arrays(ds, "loo-val", split, 10).users, eval_arrays(a, "loo-val", split, 10).users)
    tr = train_arrays(a, "loo-val", 40)
    held = _heldout_ids(ds)
    if noise.sampling == "popularity" or noise.kind == "shuffle":  # random items only from training counts
        assert not held & set(np.unique(np.concatenate([tr.ids.ravel(), tr.targets.ravel()])).tolist())
    # every sequence stays chronological
    user = np.repeat(np.arange(a.num_users), a.lengths)
    assert np.all((np.diff(a.timestamps) >= 0) | (np.diff(user) != 0))


def test_sparsity_keeps_the_last_k_training_events_and_every_evaluation_user():
    ds = _dataset()
    v = perturb(ds, "loo-val", NoiseConfig(), SparsityConfig("last_k", k=3), 0)
    assert v.lengths.max() == 5 and np.array_equal(np.minimum(ds.lengths, 5), v.lengths)
    for u in range(ds.num_users):
        assert np.array_equal(v.sequence(u)[0], ds.sequence(u)[0][-min(5, ds.lengths[u]) :])
    d = perturb(ds, "loo-val", NoiseConfig(), SparsityConfig("drop", rate=0.5), 0)
    share = 1 - (d.lengths - 2).sum() / (ds.lengths - 2).sum()
    assert 0.4 < share < 0.6
    assert np.array_equal(eval_arrays(d, "loo-val", "test", 10).targets, eval_arrays(ds, "loo-val", "test", 10).targets)


def test_noise_rates_and_kinds_do_what_they_say():
    ds = _dataset(users=200, held_out_items=False)
    n_train = int((ds.lengths - 2).sum())
    ins = perturb(ds, "loo-val", NoiseConfig("insert", 0.25), SparsityConfig(), 3)
    assert 0.2 < (len(ins.items) - len(ds.items)) / n_train < 0.3
    rep = perturb(ds, "loo-val", NoiseConfig("replace", 0.25), SparsityConfig(), 3)
    assert 0.15 < (rep.items != ds.items).mean() * len(ds.items) / n_train < 0.3  # a draw may equal the original
    sh = perturb(ds, "loo-val", NoiseConfig("shuffle", 0.99, window=4), SparsityConfig(), 3)
    assert np.array_equal(sh.timestamps, ds.timestamps) and not np.array_equal(sh.items, ds.items)
    for u in range(ds.num_users):  # a permutation inside each window of 4 training events
        a, b, n = sh.sequence(u)[0], ds.sequence(u)[0], ds.lengths[u] - 2
        for s in range(0, n, 4):
            assert sorted(a[s : min(s + 4, n)]) == sorted(b[s : min(s + 4, n)])


def test_views_follow_the_eval_setting():
    ds = _dataset()
    cfg = Config()
    apply_overrides(cfg, ["data.noise.kind=replace", "data.noise.rate=0.5", "data.sparsity.kind=last_k", "data.sparsity.k=2"])
    assert evaluation_view(ds, cfg.data, 1) is ds
    cfg.data.noise.eval = True
    ev = evaluation_view(ds, cfg.data, 1)
    assert np.array_equal(ev.lengths, ds.lengths) and not np.array_equal(ev.items, ds.items)  # noise, no sparsity
    assert training_view(ds, Config().data, 1) is ds  # off: the clean dataset itself


def test_trainer_trains_on_the_perturbed_view_and_evaluates_clean_histories():
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.train.loop import Trainer

    cfg = tiny_config("fuxi-alpha", **{"data.noise.kind": "insert", "data.noise.rate": 0.3})
    ds = load_dataset(cfg.data)
    tr = Trainer(cfg, ds, build_model(cfg.model, ds.num_items, cfg.data.max_len), torch.device("cpu"), None, progress=False)
    clean = eval_arrays(ds, "loo-val", "valid", cfg.data.max_len)
    assert tr.valid_arrs is not None and np.array_equal(tr.valid_arrs.ids, clean.ids) and np.array_equal(tr.valid_arrs.targets, clean.targets)
    assert not np.array_equal(tr.train_arrs.lengths, train_arrays(ds, "loo-val", cfg.data.max_len).lengths)
    m = tr.evaluate(tr.valid_arrs, "valid")
    assert sum(b["users"] for b in m["buckets"].values()) == m["users"]


@pytest.mark.parametrize(
    "setting,message",
    [
        ("data.noise.rate=1.0", "data.noise.rate=1.0 must be in [0, 1)"),
        ("data.sparsity.rate=-0.1", "data.sparsity.rate=-0.1 must be in [0, 1)"),
        ("data.sparsity.k=1", "data.sparsity.k=1 must be at least 2"),
        ("data.noise.kind=blur", "data.noise.kind='blur' is not one of none, insert, replace, shuffle"),
        ("data.sparsity.kind=first", "data.sparsity.kind='first' is not one of"),
        ("model.denoise=fft", "model.denoise='fft' is not one of none, filter, gate"),
    ],
)
def test_bad_robustness_settings_name_the_setting(setting, message):
    cfg = Config()
    apply_overrides(cfg, [setting])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


# ------------------------------------------------------------------ history-length buckets


def test_bucket_edges_and_user_weighted_means_reproduce_the_whole():
    assert history_buckets(np.array([1, 9, 10, 49, 50, 400])).tolist() == [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(0)
    ranks, lengths = rng.integers(1, 300, 500), rng.integers(1, 120, 500)
    whole, parts = metrics_from_ranks(ranks, (10, 50)), bucket_metrics(ranks, lengths, (10, 50))
    assert list(parts) == list(BUCKET_NAMES) and sum(p["users"] for p in parts.values()) == 500
    for k, v in whole.items():
        assert sum(p[k] * p["users"] for p in parts.values()) / 500 == pytest.approx(v, abs=1e-12)


def test_evaluate_split_reports_buckets_by_the_history_before_the_target():
    ds = _dataset()
    arrs = eval_arrays(ds, "loo-val", "test", 8)
    table = np.random.default_rng(1).normal(size=(len(arrs), ds.num_items + 1)).astype(np.float32)
    m = evaluate_split(lambda b: torch.tensor(table[b.rows]), arrs, ds, split="test", history="mask", ks=(10,), batch_size=16, beyond=False)
    full = ds.lengths - 1  # every event before the test target, not only the last 8
    want = {n: int((history_buckets(full) == i).sum()) for i, n in enumerate(BUCKET_NAMES) if (history_buckets(full) == i).any()}
    assert {n: b["users"] for n, b in m["buckets"].items()} == want and set(want) == {"short", "medium"}
    assert sum(b["MRR"] * b["users"] for b in m["buckets"].values()) / m["users"] == pytest.approx(m["MRR"])


# ------------------------------------------------------------------ model.denoise


def _models(kind, name="fuxi-alpha", **kw):
    def make(denoise):
        torch.manual_seed(0)
        cfg = ModelConfig(name=name, dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, dropout=0.0, denoise=denoise, **kw)
        return (FuxiAlpha if name == "fuxi-alpha" else FuxiMME)(cfg, num_items=30, max_len=12).eval()

    return make("none"), make(kind)


def _batch(B=3, N=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 31, (B, N), generator=g)
    ids[0, 7:] = 0  # a padded row
    ts = torch.cumsum(torch.randint(1, 10_000, (B, N), generator=g), 1)
    return ids, ts, torch.cat([ts[:, 1:], ts[:, -1:] + 50], 1)


@pytest.mark.parametrize("name,kw", [("fuxi-alpha", {}), ("fuxi-mme", {"num_embeddings": 2})])
@pytest.mark.parametrize("kind", ["filter", "gate"])
def test_denoise_off_is_todays_model_and_a_neutral_option_changes_nothing(name, kind, kw):
    today, opt = _models(kind, name, **kw)
    plain = ModelConfig(name=name, dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, dropout=0.0, **kw)
    torch.manual_seed(0)
    ref = (FuxiAlpha if name == "fuxi-alpha" else FuxiMME)(plain, num_items=30, max_len=12).eval()
    assert today.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in today.state_dict().items())
    extra = set(opt.state_dict()) - set(today.state_dict())
    assert extra and all(k.startswith("denoise.") for k in extra)
    opt.load_state_dict({**opt.state_dict(), **today.state_dict()})
    with torch.no_grad():  # a zero filter spectrum, or a gate that keeps everything, is the identity
        if kind == "filter":
            opt.denoise.spectrum.zero_()
        else:
            opt.denoise.net[2].bias.fill_(100.0)
    ids, ts, qts = _batch()
    torch.testing.assert_close(opt(ids, ts, qts), today(ids, ts, qts), rtol=0, atol=1e-6)
    assert opt.aux_loss() is None and today.aux_loss() is None


def test_filter_is_causal_and_ignores_padding():
    f = FrequencyFilter(4, 12)
    x = torch.randn(2, 10, 4)
    valid = torch.ones(2, 10, dtype=torch.bool)
    y = f(x, valid)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 4)
    torch.testing.assert_close(f(x2, valid)[:, :6], y[:, :6])
    # the same as the direct causal convolution with the kernel's taps
    k = f.kernel(10)
    want = x + torch.stack([sum(x[:, i - j] * k[j] for j in range(i + 1)) for i in range(10)], 1)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


def test_gate_penalty_is_the_aux_loss_and_low_weights_are_dropped_in_training():
    _, model = _models("gate")
    model.train()
    ids, ts, qts = _batch()
    with torch.no_grad():
        model.denoise.net[2].bias.fill_(-10.0)  # every weight below the hard-drop threshold
    model(ids, ts, qts)
    aux = model.aux_loss()
    assert aux is not None and float(aux.detach()) == 0.0  # every event dropped: the penalty (mean keep weight) is 0
    model.release_aux_graphs()
    assert model.aux_loss() is None
    with torch.no_grad():
        model.denoise.net[2].bias.fill_(3.0)
    model(ids, ts, qts)
    aux = model.aux_loss()
    w = torch.sigmoid(torch.tensor(3.0))
    assert float(aux.detach()) == pytest.approx(0.01 * float(w), rel=1e-5) and aux.requires_grad
    assert not model.independent_length_chunks()


def test_training_with_gate_and_noise_reports_buckets(tmp_path):
    import json

    from fuxi_mme.train.run import train

    over = {"model.denoise": "gate", "data.noise.kind": "replace", "data.noise.rate": 0.2, "train.epochs": 2, "log.run_dir": str(tmp_path / "r")}
    out = train(tiny_config("fuxi-mme", **over))
    assert sum(b["users"] for b in out["test"]["buckets"].values()) == out["test"]["users"]
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in logged if r.get("kind", "train") == "train" and "loss" in r)


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.kind)
def test_a_perturbed_view_keeps_each_events_behaviour_and_the_target_behaviour(noise):
    ds = _dataset(users=80, held_out_items=False)
    rng = np.random.default_rng(1)
    ds.behaviors = rng.integers(1, 3, len(ds.items)).astype(np.int8)
    ds.behavior_names, ds.target_behavior = ["view", "buy"], "buy"
    for sparsity in SPARSITIES:
        out = perturb(ds, "loo-val", noise, sparsity, 5)
        assert out.behaviors is not None and len(out.behaviors) == len(out.items)
        assert out.behavior_names == ["view", "buy"] and out.target_behavior == "buy"
        if noise.kind != "insert" and sparsity.kind == "none":  # events stay where they were: so do their behaviours
            assert np.array_equal(out.behaviors, ds.behaviors)
