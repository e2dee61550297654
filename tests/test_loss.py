import math

import pytest
import torch

from fuxi_mme.train.loss import sampled_softmax_loss


def test_loss_paths_agree_and_match_brute_force():
    torch.manual_seed(0)
    B, N, D, I, K = 2, 4, 8, 20, 5
    user = torch.nn.functional.normalize(torch.randn(B, N, D), dim=-1).requires_grad_(True)
    items = torch.nn.functional.normalize(torch.randn(I + 1, D), dim=-1).requires_grad_(True)
    targets = torch.randint(1, I + 1, (B, N))
    targets[1, 3] = 0  # ignored position
    negs = torch.randint(1, I + 1, (B, N, K))
    negs[0, 0, 0] = targets[0, 0]  # a collision, masked out
    vals, grads = [], []
    for method in ("all", "gather"):
        user.grad = items.grad = None
        loss = sampled_softmax_loss(user, targets, items, negs, 0.05, method=method)
        loss.backward()
        vals.append(loss.detach())
        grads.append((user.grad.clone(), items.grad.clone()))
    torch.testing.assert_close(vals[0], vals[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    total, count = 0.0, 0
    for b in range(B):
        for n in range(N):
            t = int(targets[b, n])
            if t == 0:
                continue
            pos = (user[b, n] @ items[t]).item() / 0.05
            logits = [pos] + [(user[b, n] @ items[j]).item() / 0.05 for j in negs[b, n].tolist() if j != t]
            total += math.log(sum(math.exp(x) for x in logits)) - pos
            count += 1
    assert abs(float(vals[0]) - total / count) < 1e-4


@pytest.mark.parametrize("sparse_items", [10**9, 0], ids=["dense-backward", "scatter-backward"])
def test_positions_and_the_chunked_cpu_path_equal_the_dense_loss(monkeypatch, sparse_items):
    """Skipping padding (positions) and scoring all items in blocks change nothing, with the
    CPU backward's dense products (small catalogues) or its scatter (large ones)."""
    import fuxi_mme.train.loss as L

    monkeypatch.setattr(L, "SPARSE_ITEMS", sparse_items)
    monkeypatch.setattr(L, "CHUNK_ROWS", 7)  # several blocks, the last one partial
    monkeypatch.setattr(L, "GATHER_ROWS", 5)
    torch.manual_seed(0)
    B, N, D, I, K = 4, 30, 16, 500, 32
    u = torch.nn.functional.normalize(torch.randn(B, N, D), dim=-1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(I + 1, D), dim=-1).requires_grad_()
    t = torch.randint(1, I + 1, (B, N))
    t[:, 25:] = 0
    t[3, 5:] = 0
    n = torch.randint(1, I + 1, (B, N, K))
    n[0, 0, :3] = t[0, 0]  # negatives equal to the target are masked in every path
    pos = torch.nonzero(t.reshape(-1) != 0).squeeze(1)
    dense = L.sampled_softmax_loss(u, t, items, n, 0.05, method="all")
    g_dense = torch.autograd.grad(dense, (u, items))
    for method in ("all", "chunked"):
        got = L.sampled_softmax_loss(u, t, items, n, 0.05, method=method, positions=pos, normalizer=float(len(pos)))
        g = torch.autograd.grad(got, (u, items))
        assert got.item() == pytest.approx(dense.item(), rel=1e-6)
        torch.testing.assert_close(g[0], g_dense[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g[1], g_dense[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs the target positions"):
        L.sampled_softmax_loss(u, t, items, n, 0.05, method="chunked")


def test_full_softmax_is_cross_entropy_over_every_item_but_padding():
    torch.manual_seed(0)
    B, N, D, I = 3, 5, 8, 40
    u = torch.nn.functional.normalize(torch.randn(B, N, D), dim=-1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(I + 1, D), dim=-1).requires_grad_()
    t = torch.randint(1, I + 1, (B, N))
    t[2, 3:] = 0  # padding positions are ignored
    no_negs = torch.zeros(B, N, 0, dtype=torch.long)
    got = sampled_softmax_loss(u, t, items, no_negs, 0.1, full=True)
    keep = t.reshape(-1) != 0
    # the reference: ordinary cross-entropy over items 1..I (row 0, padding, is no candidate)
    ref = torch.nn.functional.cross_entropy((u.reshape(-1, D)[keep] @ items[1:].T) / 0.1, t.reshape(-1)[keep] - 1)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    g, g_ref = torch.autograd.grad(got, (u, items)), torch.autograd.grad(ref, (u, items))
    torch.testing.assert_close(g[0], g_ref[0])
    torch.testing.assert_close(g[1], g_ref[1])
    assert g[1][0].abs().sum() == 0  # the padding row gets no gradient
    # skipping padding through ``positions`` changes nothing
    pos = torch.nonzero(keep).squeeze(1)
    got_p = sampled_softmax_loss(u, t, items, no_negs, 0.1, full=True, positions=pos, normalizer=float(len(pos)))
    assert got_p.item() == pytest.approx(got.item(), rel=1e-6)


def test_full_softmax_training_draws_no_negatives_and_learns():
    import numpy as np

    from conftest import tiny_config
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.train.loop import Trainer

    cfg = tiny_config("fuxi-mme", **{"train.loss": "full", "train.length_chunks": 2})
    ds = load_dataset(cfg.data)
    torch.manual_seed(0)
    tr = Trainer(cfg, ds, build_model(cfg.model, ds.num_items, cfg.data.max_len), torch.device("cpu"), None, progress=False)
    state = tr.sampler.generator.get_state()
    rows = np.arange(64)
    losses = []
    for _ in range(30):
        loss, _ = tr.forward_backward(rows)
        tr.opt.step()
        tr.opt.zero_grad()
        losses.append(float(loss))
    assert torch.equal(tr.sampler.generator.get_state(), state)  # nothing sampled
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_unknown_loss_is_refused():
    from fuxi_mme.config import Config, ConfigError, validate

    cfg = Config()
    cfg.train.loss = "bpr"
    with pytest.raises(ConfigError, match="train.loss='bpr' is not one of sampled, full"):
        validate(cfg)


def test_full_softmax_in_blocks_equals_one_block(monkeypatch):
    """A catalogue too large for one (positions x items) logits tensor goes in blocks of
    positions, recomputed in the backward: the same loss and gradients."""
    import fuxi_mme.train.loss as L

    torch.manual_seed(1)
    P, D, I = 23, 8, 50
    u = torch.nn.functional.normalize(torch.randn(1, P, D), dim=-1).requires_grad_()
    items = torch.nn.functional.normalize(torch.randn(I + 1, D), dim=-1).requires_grad_()
    t = torch.randint(1, I + 1, (1, P))
    no_negs = torch.zeros(1, P, 0, dtype=torch.long)
    one = L.sampled_softmax_loss(u, t, items, no_negs, 0.05, full=True)
    g_one = torch.autograd.grad(one, (u, items))
    monkeypatch.setattr(L, "FULL_MAX_LOGITS", 5 * (I + 1))  # blocks of 5 positions, the last partial
    blocks = L.sampled_softmax_loss(u, t, items, no_negs, 0.05, full=True)
    g_blocks = torch.autograd.grad(blocks, (u, items))
    assert blocks.item() == pytest.approx(one.item(), rel=1e-6)
    torch.testing.assert_close(g_blocks[0], g_one[0])
    torch.testing.assert_close(g_blocks[1], g_one[1])
