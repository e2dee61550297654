import numpy as np
import pytest
import torch

from fuxi_mme.data.prepared import build_prepared
from fuxi_mme.data.splits import eval_arrays
from fuxi_mme.eval.evaluator import evaluate_ranks
from fuxi_mme.eval.metrics import metrics_from_ranks, ranks_from_scores


def test_metrics_hand_computed():
    m = metrics_from_ranks(np.array([1, 2, 11, 60]), ks=(10, 50))
    assert m["HR@10"] == pytest.approx(0.5)
    assert m["HR@50"] == pytest.approx(0.75)
    assert m["NDCG@10"] == pytest.approx((1.0 + 1 / np.log2(3)) / 4)
    assert m["NDCG@50"] == pytest.approx((1.0 + 1 / np.log2(3) + 1 / np.log2(12)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 60) / 4)


def test_rank_counts_only_strictly_higher_scores():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.9, 0.1], [0.0, 0.2, 0.2, 0.2, -torch.inf]])
    ranks = ranks_from_scores(scores, torch.tensor([1, 2]))
    # row 0: only 0.9 is strictly higher (the tie at 0.5 does not count); row 1: all tied
    assert ranks.tolist() == [2, 1]


def brute_force_ranks(scores, targets, seen):
    """Every seen item masked, the target too (then it is a miss: rank = number of items + 1)."""
    out = []
    for s, t, h in zip(scores, targets, seen):
        if t in set(h):
            out.append(len(s))  # the scores have I + 1 columns (padding first)
            continue
        s = s.copy()
        s[0] = -np.inf
        for i in h:
            s[i] = -np.inf
        out.append(1 + sum(1 for j in range(len(s)) if s[j] > s[t]))
    return np.array(out)


@pytest.mark.parametrize("filter_history", ["mask", "keep"])
def test_evaluator_matches_brute_force_with_ties_and_filtering(filter_history):
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        n = rng.integers(2, 12)
        for j in range(n):
            rows.append((u, int(rng.integers(1, 30)), j))  # repeats allowed: target may be in history
    df = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    ds, _ = build_prepared(df, "t")
    arrs = eval_arrays(ds, "paper", "test", max_len=5)
    I = ds.num_items + 1
    table = np.round(rng.normal(size=(len(arrs), I)), 1)  # rounding makes many ties

    widths = []

    def scorer(batch):
        # the batch's rows, each batch trimmed to its own longest sequence
        assert batch.ids.shape[1] == int(arrs.lengths[batch.rows].max())
        widths.append(batch.ids.shape[1])
        return torch.tensor(table[batch.rows], dtype=torch.float32)

    got = evaluate_ranks(scorer, arrs, ds, filter_history, batch_size=7)
    # shortest rows first: batch widths never decrease, and the short ones are not padded to 5
    assert widths == sorted(widths) and widths[0] < widths[-1]
    # any subset comes back in its own order
    some = np.random.default_rng(1).permutation(len(arrs))[:15]
    np.testing.assert_array_equal(evaluate_ranks(scorer, arrs, ds, filter_history, batch_size=4, rows=some), got[some])
    seen = [ds.items[a:b] if filter_history == "mask" else [] for a, b in zip(arrs.hist_start, arrs.hist_end)]
    want = brute_force_ranks(table.astype(np.float32), arrs.targets, seen)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        [metrics_from_ranks(got)[k] for k in ("HR@10", "NDCG@10", "MRR")],
        [np.mean(want <= 10), np.mean(np.where(want <= 10, 1 / np.log2(want + 1), 0)), np.mean(1 / want)],
    )


@pytest.mark.parametrize("model", ["fuxi-mme", "fuxi-alpha", "hstu", "sasrec"])
def test_length_sorted_batches_rank_as_one_row_at_a_time(model):
    """Evaluation batches take rows shortest first, each padded to its own longest sequence: the
    ranks equal scoring every row alone at its own length, in the rows' order."""
    from conftest import tiny_config
    from fuxi_mme.data import load_dataset
    from fuxi_mme.data.splits import eval_arrays
    from fuxi_mme.eval.evaluator import model_scorer
    from fuxi_mme.models import build_model

    cfg = tiny_config(model)
    ds = load_dataset(cfg.data)
    arrs = eval_arrays(ds, "loo-val", "test", cfg.data.max_len)
    assert len(set(arrs.lengths.tolist())) > 5  # lengths vary, so the order and trimming matter
    torch.manual_seed(0)
    net = build_model(cfg.model, ds.num_items, cfg.data.max_len).eval()
    scorer = model_scorer(net)
    alone = np.concatenate([evaluate_ranks(scorer, arrs, ds, batch_size=1, rows=np.array([r])) for r in range(len(arrs))])
    np.testing.assert_array_equal(evaluate_ranks(scorer, arrs, ds, batch_size=64), alone)
