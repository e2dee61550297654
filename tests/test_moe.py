import pytest
import torch

from fuxi_mme.models.moe import MoE


def make(kind="swiglu", E=4, K=2, **kw):
    torch.manual_seed(0)
    return MoE(8, 6, E, K, kind=kind, hidden=10, bias=(kind == "linear"), **kw)


def run_both(moe, x, valid=None, backends=("loop", "batched", "dense")):
    outs = []
    for backend in backends:
        moe.backend = backend
        moe.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = moe(xx, valid)
        assert moe.last_path == {"loop": "loop", "batched": "padded", "dense": "dense"}[backend]  # CPU: no grouped GEMM
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xx.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}))
    return outs


@pytest.mark.parametrize("kind", ["swiglu", "linear"])
@pytest.mark.parametrize("E,K", [(4, 1), (4, 2), (4, 4), (1, 1)])
@pytest.mark.parametrize("shared", [False, True])
def test_backends_agree_values_and_gradients(kind, E, K, shared):
    moe = make(kind, E, K, shared_expert=shared)
    x = torch.randn(3, 7, 8)
    (y1, gx1, gp1), *others = run_both(moe, x)
    assert y1.shape == (3, 7, 6)
    for y2, gx2, gp2 in others:
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
        assert gp1.keys() == gp2.keys()
        for n in gp1:
            torch.testing.assert_close(gp1[n], gp2[n], rtol=1e-5, atol=1e-6, msg=n)


def test_expert_with_no_tokens_and_all_tokens_to_one_expert():
    moe = make("swiglu", E=4, K=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] += 1.0  # expert 2 wins whenever sum(x) > 0
    x = torch.rand(20, 8) + 0.1  # positive: every token goes to expert 2, experts 0, 1, 3 idle
    (y1, gx1, gp1), *others = run_both(moe, x)
    for y2, _gx2, gp2 in others:
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gp1["w1"], gp2["w1"], rtol=1e-5, atol=1e-6)
    assert gp1["w1"][[0, 1, 3]].abs().sum() == 0 and gp1["w1"][2].abs().sum() > 0
    assert moe.last_stats["load"].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_k_equals_e_is_the_gate_weighted_sum_of_all_experts():
    moe = make("linear", E=3, K=3)
    x = torch.randn(5, 8)
    y = moe(x)
    probs = moe.router(x).softmax(-1)
    want = sum(probs[:, e : e + 1] * (x @ moe.w[e] + moe.b[e]) for e in range(3))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_valid_mask_excludes_padding_from_statistics():
    moe = make("swiglu", E=4, K=1)
    x = torch.randn(10, 8)
    valid = torch.zeros(10, dtype=torch.bool)
    valid[:4] = True
    moe(x, valid)
    load_masked = moe.last_stats["load"]
    moe(x[:4])
    torch.testing.assert_close(load_masked, moe.last_stats["load"])


def _skewed_task(balance, weight=1.0, steps=300):
    """Regression where 4 experts are useful, with a router skewed towards expert 0 at start."""
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 1, kind="linear", balance=balance, aux_loss_weight=weight, bias_update_rate=0.01)
    with torch.no_grad():
        moe.router.weight.mul_(0.1)
        moe.router.weight[0] += 0.5
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(4, 8, 8, generator=g)
    x = torch.randn(1024, 8, generator=g)
    x[:, 0] += 3.0
    cluster = (x[:, 1] > 0).long() * 2 + (x[:, 2] > 0).long()
    y = torch.einsum("td,tdo->to", x, maps[cluster])
    moe(x)
    start = moe.last_stats["load"].clone()
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (moe(x) - y).pow(2).mean()
        if moe.last_aux is not None:
            loss = loss + moe.last_aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    moe.eval()
    moe(x)
    return start, moe.last_stats["load"]


def test_aux_loss_balances_a_skewed_router():
    start, plain = _skewed_task("none")
    _, balanced = _skewed_task("aux_loss")
    assert start.max() > 0.8  # the toy really is skewed
    assert plain.min() < 0.01  # without balancing an expert starves
    assert balanced.min() > 0.1 and balanced.max() < plain.max() + 0.05


def test_aux_free_bias_balances_a_frozen_skewed_router():
    torch.manual_seed(0)
    moe = MoE(8, 8, 4, 1, kind="linear", balance="aux_free", bias_update_rate=0.01)
    with torch.no_grad():
        moe.router.weight.mul_(0.1)
        moe.router.weight[0] += 0.5
    x = torch.randn(1024, 8)
    x[:, 0] += 3.0
    moe.eval()
    moe(x)
    before = moe.last_stats["load"].clone()
    moe.train()
    for _ in range(300):  # only the selection bias moves (no optimizer)
        moe(x)
    moe.eval()
    moe(x)
    after = moe.last_stats["load"]
    assert before.max() > 0.8 and after.max() < 0.4 and after.min() > 0.02
    assert moe.expert_bias[0] < 0 < moe.expert_bias[1:].max()


@pytest.mark.parametrize("backend", ["loop", "batched", "dense"])
@pytest.mark.parametrize("kind", ["swiglu", "linear"])
def test_backends_run_under_bf16_autocast(backend, kind):
    moe = make(kind, E=4, K=2, shared_expert=True)
    moe.backend = backend
    x = torch.randn(10, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    y.float().sum().backward()
    ref = make(kind, E=4, K=2, shared_expert=True)(x.detach())
    assert y.dtype == torch.float32 and x.grad is not None
    torch.testing.assert_close(y, ref, rtol=5e-2, atol=5e-2)


def test_auto_backend_is_dense_for_few_experts_and_batched_for_many():
    x = torch.randn(6, 8)
    small, many = make("swiglu", E=4, K=2), make("swiglu", E=16, K=2)
    small(x), many(x)
    assert small.last_path == "dense" and many.last_path == "padded"  # "grouped" on CUDA + bf16


def test_group_ends_equal_cumsum_of_bincount():
    from fuxi_mme.models.moe_dispatch import group_ends

    torch.manual_seed(0)
    for E in (1, 4, 16):
        ids = torch.sort(torch.randint(0, E, (1000,))).values
        ids = ids[ids != E // 2]  # an idle expert in the middle
        assert torch.equal(group_ends(ids, E), torch.cumsum(torch.bincount(ids, minlength=E), 0))
    assert group_ends(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_no_autograd_graph_outlives_a_training_step():
    """After ``Trainer.forward_backward`` neither the returned losses nor any MoE layer's last
    aux loss still hold the step's autograd graph (held, it keeps that step's gradient
    accumulation nodes and their CUDA stream alive into the next step's graph capture)."""
    import numpy as np

    from conftest import tiny_config
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.models.moe import MoE
    from fuxi_mme.train.loop import Trainer

    for chunks in (1, 2):
        cfg = tiny_config("fuxi-mme", **{"train.length_chunks": chunks})
        ds = load_dataset(cfg.data)
        net = build_model(cfg.model, ds.num_items, cfg.data.max_len)
        tr = Trainer(cfg, ds, net, torch.device("cpu"), None, progress=False)
        loss, aux = tr.forward_backward(np.arange(cfg.train.batch_size))
        assert loss.grad_fn is None and aux is not None and aux.grad_fn is None
        layers = [m for m in net.modules() if isinstance(m, MoE)]
        assert layers and all(m.last_aux is not None and m.last_aux.grad_fn is None for m in layers)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("E", [1, 4, 40])  # 40 > COUNTING_MAX_EXPERTS: the sorting branch
def test_dispatch_plan_equals_a_stable_sort(E):
    from fuxi_mme.models.moe_dispatch import dispatch_plan

    torch.manual_seed(0)
    ids = torch.randint(0, E, (997,))
    ids = ids[ids != E // 2] if E > 1 else ids  # an idle expert
    dest, slot_to_a, ends = dispatch_plan(ids, E)
    order = torch.argsort(ids, stable=True)
    assert torch.equal(slot_to_a, order)
    assert torch.equal(dest[order], torch.arange(ids.numel()))  # the inverse permutation
    assert torch.equal(ends, torch.cumsum(torch.bincount(ids, minlength=E), 0))
    empty = dispatch_plan(torch.zeros(0, dtype=torch.long), 3)
    assert [t.tolist() for t in empty] == [[], [], [0, 0, 0]]


def test_permutation_rows_have_gather_backwards_equal_to_indexing():
    from fuxi_mme.models.moe_dispatch import DispatchRows, PermuteRows, dispatch_plan

    torch.manual_seed(0)
    T, K, E = 11, 2, 3
    top = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    dest, slot_to_a, _ = dispatch_plan(top.reshape(-1), E)
    x = torch.randn(T, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: DispatchRows.apply(x, dest, slot_to_a, K), (x,))
    y = DispatchRows.apply(x, dest, slot_to_a, K)
    assert torch.equal(y, x[slot_to_a // K])  # plain indexing, the reference
    z = torch.randn(T * K, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: PermuteRows.apply(z, dest, slot_to_a), (z,))
    assert torch.equal(PermuteRows.apply(z, dest, slot_to_a), z[dest])


@pytest.mark.parametrize("kind", ["swiglu", "linear"])
def test_padding_is_left_out_of_the_experts_in_every_backend(kind):
    moe = make(kind, 4, 2, shared_expert=False)
    x = torch.randn(3, 7, 8)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, 4:] = False
    valid[2, 1:] = False
    (y1, gx1, gp1), *others = run_both(moe, x, valid)
    assert torch.equal(y1[~valid], torch.zeros_like(y1[~valid]))
    assert torch.equal(gx1[~valid], torch.zeros_like(gx1[~valid]))
    for y2, gx2, gp2 in others:
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
        for n in gp1:
            torch.testing.assert_close(gp1[n], gp2[n], rtol=1e-5, atol=1e-6, msg=n)
    # the real tokens' outputs are those of a call that computes every token
    moe.backend = "batched"
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[valid], y1[valid], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["ffn", "u", "out"])
def test_fuxi_mme_loss_and_gradients_do_not_depend_on_computing_padding(placement, monkeypatch):
    """Sequences are padded after their items and attention is causal, so the experts' output
    at padding reaches nothing the loss sees: leaving padding out of the experts gives the same
    loss and the same gradients as computing it."""
    from fuxi_mme.config import ModelConfig, MoEConfig
    from fuxi_mme.models import build_model
    from fuxi_mme.models.moe import MoE

    cfg = ModelConfig(
        name="fuxi-mme",
        dim=16,
        num_layers=2,
        num_heads=2,
        qk_dim=4,
        v_dim=4,
        dropout=0.0,
        num_embeddings=2,
        moe=MoEConfig(num_experts=4, top_k=2, placement=placement, backend="batched"),
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 41, (4, 9), generator=g)
    ids[0, 5:] = 0
    ids[2, 2:] = 0
    ts = torch.cumsum(torch.randint(1, 1000, (4, 9), generator=g), 1)

    def loss_and_grads():
        torch.manual_seed(0)
        model = build_model(cfg, 40, 9)
        out = model(ids, ts, ts + 1)
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        loss = ((out * target).sum(-1) * (ids != 0)).sum() + model.aux_loss()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    skip_loss, skip_grads = loss_and_grads()
    every_token = MoE._batched
    monkeypatch.setattr(MoE, "_batched", lambda self, x, top, gate, valid_T=None: every_token(self, x, top, gate, None))
    full_loss, full_grads = loss_and_grads()
    torch.testing.assert_close(skip_loss, full_loss)
    assert skip_grads.keys() == full_grads.keys()
    for n in skip_grads:
        torch.testing.assert_close(skip_grads[n], full_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_running_counts_across_chunks():
    from fuxi_mme.models.moe_dispatch import _running_counts

    torch.manual_seed(0)
    for A, E, chunk in ((1, 1, 4), (10, 3, 4), (4099, 5, 1024), (37, 4, 37)):
        ids = torch.randint(0, E, (A,))
        rank, counts = _running_counts(ids, E, chunk)
        want = torch.tensor([int((ids[:i] == ids[i]).sum()) for i in range(A)])
        assert torch.equal(rank, want), (A, E, chunk)
        assert torch.equal(counts, torch.bincount(ids, minlength=E))


@pytest.mark.parametrize("E,K", [(4, 1), (4, 2), (8, 3), (4, 4), (64, 4), (80, 2), (16, 6)])
def test_top_k_indices_equal_topk(E, K):
    from fuxi_mme.models.moe_dispatch import top_k_indices

    g = torch.Generator().manual_seed(E * 10 + K)
    x = torch.randn(500, E, generator=g)  # continuous: no ties
    got = top_k_indices(x, K)
    assert got.shape == (500, K) and got.dtype == torch.long
    assert torch.equal(got, x.topk(K, dim=-1).indices)
    x[:, 1] = x[:, 0]  # ties: every pick is still a distinct index among the k largest values
    got = top_k_indices(x, K)
    assert (got.sort(-1).values.diff(dim=-1) > 0).all()
    assert torch.equal(x.gather(-1, got), x.topk(K, dim=-1).values)


def test_load_statistics_count_each_real_tokens_assignments():
    moe = make("linear", E=5, K=2)
    x = torch.randn(40, 8)
    valid = torch.rand(40) > 0.3
    moe(x, valid)
    top = moe.router(x).float().topk(2, dim=-1).indices[valid]
    want = torch.bincount(top.reshape(-1), minlength=5).float() / top.numel()
    torch.testing.assert_close(moe.last_stats["load"], want)
