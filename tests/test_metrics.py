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
    out = []
    for s, t, h in zip(scores, targets, seen):
        s = s.copy()
        s[0] = -np.inf
        for i in h:
            if i != t:
                s[i] = -np.inf
        out.append(1 + sum(1 for j in range(len(s)) if s[j] > s[t]))
    return np.array(out)


@pytest.mark.parametrize("filter_history", [True, False])
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

    def scorer(batch):
        # rows of this batch, recovered through the targets' order
        return torch.tensor(table[scorer.rows], dtype=torch.float32)

    got = []
    for s in range(0, len(arrs), 7):
        rows_b = np.arange(s, min(s + 7, len(arrs)))
        scorer.rows = rows_b
        got.append(evaluate_ranks(scorer, arrs, ds, filter_history, batch_size=7, rows=rows_b))
    got = np.concatenate(got)
    seen = [ds.items[a:b] if filter_history else [] for a, b in zip(arrs.hist_start, arrs.hist_end)]
    want = brute_force_ranks(table.astype(np.float32), arrs.targets, seen)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        [metrics_from_ranks(got)[k] for k in ("HR@10", "NDCG@10", "MRR")],
        [np.mean(want <= 10), np.mean(np.where(want <= 10, 1 / np.log2(want + 1), 0)), np.mean(1 / want)],
    )
