"""The fused ranking kernel (eval.ranking=fused, eval/rank_kernel.py) against the reference
that writes every score: the same ranks, masked targets and non-finite flags, ties and NaNs
included. On a CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1`` is set here);
skipped without triton. tests/test_gpu.py runs it compiled on a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fuxi_mme.config import Config, ConfigError, apply_overrides, validate  # noqa: E402
from fuxi_mme.data.prepared import build_prepared  # noqa: E402
from fuxi_mme.data.splits import eval_arrays  # noqa: E402
from fuxi_mme.eval import (
    evaluator,  # noqa: E402
    rank_kernel,  # noqa: E402
)

pytestmark = pytest.mark.skipif(not rank_kernel.HAVE_TRITON, reason="triton not installed")


class TableVectors(evaluator.VectorScorer):
    """Fixed user vectors (one per evaluation row) and item vectors."""

    def __init__(self, users_RD: torch.Tensor, items_ID: torch.Tensor):
        super().__init__(None)  # type: ignore[arg-type]
        self.table, self._items_ID = users_RD, items_ID

    def users(self, batch):
        return self.table[torch.as_tensor(batch.rows)].to(batch.ids.device)


def _case(seed: int, users: int = 40, items: int = 300, width: int = 50, nan_rows: int = 0):
    """A log with repeats, and small-integer vectors: every product is exact in fp32 and TF32,
    so the two rankings see the same scores, with many ties."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = int(rng.integers(3, 30))
        seq = rng.integers(1, items + 1, n)
        seq[rng.random(n) < 0.2] = seq[0]  # repeats, a repeated target among them
        rows += [(u, int(it), t) for t, it in enumerate(seq)]
    rows += [(users, it, it) for it in range(1, items + 1)]  # every item appears
    ds, _ = build_prepared(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), "t")
    arrs = eval_arrays(ds, "paper", "test", max_len=50)
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-2, 3, (len(arrs), width), generator=g).float()
    v = torch.randint(-2, 3, (ds.num_items + 1, width), generator=g).float()
    v[0] = 0
    if nan_rows:
        v[5, 3] = float("nan")  # a NaN candidate: it outranks every target
        u[:nan_rows, 0] = float("nan")  # these users' targets are not finite
    return ds, arrs, TableVectors(u, v)


@pytest.mark.parametrize("history", ["mask", "keep"])
@pytest.mark.parametrize("width", [50, 100])
def test_fused_ranks_equal_the_reference(history, width):
    ds, arrs, sc = _case(seed=width, width=width, nan_rows=2)
    ref = evaluator.rank_split(sc, arrs, ds, history, batch_size=16, ranking="scores")
    got = evaluator.rank_split(sc, arrs, ds, history, batch_size=16, ranking="fused")
    assert ref.nonfinite.sum() == 2 and (history == "keep" or ref.masked_target.any())
    np.testing.assert_array_equal(got.nonfinite, ref.nonfinite)
    np.testing.assert_array_equal(got.masked_target, ref.masked_target)
    np.testing.assert_array_equal(got.ranks, ref.ranks)
    assert len(np.unique(ref.ranks)) > 5  # the ranks vary: the comparison is not vacuous


@pytest.mark.parametrize("items", [256, 257, 383])
def test_whole_and_partial_item_tiles(items):
    """Catalogues of whole 128-item tiles only, and with a last tile of 1 or 127 items (the
    kernel's loop over whole tiles has no bounds mask; the partial tile is scanned apart)."""
    ds, arrs, sc = _case(seed=items, users=30, items=items, width=50, nan_rows=1)
    assert rank_kernel.tiles(50)[1] == 128 and ds.num_items == items
    ref = evaluator.rank_split(sc, arrs, ds, "mask", batch_size=32, ranking="scores")
    got = evaluator.rank_split(sc, arrs, ds, "mask", batch_size=32, ranking="fused")
    np.testing.assert_array_equal(got.nonfinite, ref.nonfinite)
    np.testing.assert_array_equal(got.ranks, ref.ranks)


def test_fused_ranks_split_the_catalogue_across_programs():
    """More items than one program scans (several item ranges add into one count)."""
    ds, arrs, sc = _case(seed=3, users=20, items=1500, width=16)
    ref = evaluator.rank_split(sc, arrs, ds, "mask", batch_size=64, ranking="scores").ranks
    np.testing.assert_array_equal(evaluator.rank_split(sc, arrs, ds, "mask", batch_size=64, ranking="fused").ranks, ref)


def test_pair_scores_are_the_tile_products():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(7, 50, generator=g), torch.randn(30, 50, generator=g)
    rows, cols = torch.tensor([0, 3, 6, 6, 1]), torch.tensor([2, 29, 0, 7, 7])
    want = (u[rows] * v[cols]).sum(1)
    torch.testing.assert_close(rank_kernel.pair_scores(u, v, rows, cols), want, rtol=1e-5, atol=1e-5)


def test_evaluate_split_auto_and_explicit():
    ds, arrs, sc = _case(seed=1)
    assert evaluator.resolve_ranking("auto", sc, "cpu", beyond=True) == "scores"
    assert evaluator.resolve_ranking("auto", sc, "cpu", beyond=False) == "fused"  # the interpreter counts as able
    assert evaluator.resolve_ranking("fused", lambda b: None, "cpu", beyond=False) == "scores"  # popularity: no vectors
    with pytest.raises(ValueError, match="eval.ranking=fused needs eval.beyond=false"):
        evaluator.resolve_ranking("fused", sc, "cpu", beyond=True)
    kw = dict(split="test", history="mask", ks=(5, 10), batch_size=16, beyond=False)
    a = evaluator.evaluate_split(sc, arrs, ds, ranking="fused", **kw)
    b = evaluator.evaluate_split(sc, arrs, ds, ranking="scores", **kw)
    assert a == b


def test_fused_ranking_outside_the_interpreter_without_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert rank_kernel.available("cpu", 50) == "needs a CUDA GPU"
    assert rank_kernel.available("cuda", 512) == "takes scoring vectors up to 256 wide, not 512"
    assert rank_kernel.available("cuda", 256) is None


def test_config_rejects_an_unknown_ranking():
    cfg = Config()
    apply_overrides(cfg, ["eval.ranking=fast"])
    with pytest.raises(ConfigError, match="eval.ranking='fast' is not one of auto, scores, fused"):
        validate(cfg)


@pytest.mark.parametrize("ranking", ["scores", "fused"])
def test_a_long_ranking_says_how_far_it_is(ranking, monkeypatch, caplog):
    import logging

    ds, arrs, sc = _case(seed=2)
    monkeypatch.setattr(evaluator, "PROGRESS_EVERY", 1)
    with caplog.at_level(logging.DEBUG, logger="fuxi_mme.eval.evaluator"):
        evaluator.rank_split(sc, arrs, ds, "keep", batch_size=16, ranking=ranking)
    lines = [r.getMessage() for r in caplog.records if r.name == "fuxi_mme.eval.evaluator"]
    assert lines[0].startswith(f"ranked 16 of {len(arrs)} users") and lines[0].endswith(f"({ranking})")
    assert len(lines) == (len(arrs) - 1) // 16


def test_batches_gathered_ahead_come_in_order_and_errors_surface():
    got = list(evaluator._ahead(lambda x: x * 2, [(i,) for i in range(7)]))
    assert got == [0, 2, 4, 6, 8, 10, 12] and list(evaluator._ahead(abs, [])) == []

    def fails_on_3(x):
        if x == 3:
            raise OSError("damaged cache")
        return x

    it = evaluator._ahead(fails_on_3, [(i,) for i in range(6)])
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(OSError, match="damaged cache"):
        next(it)
