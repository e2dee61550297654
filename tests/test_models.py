import itertools

import pytest
import torch

from fuxi_mme.config import ModelConfig, MoEConfig
from fuxi_mme.models import build_model
from fuxi_mme.models.fuxi_alpha import FuxiAlpha
from fuxi_mme.models.fuxi_mme import FuxiMME

I, N = 40, 12


def batch(B=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, I + 1, (B, n), generator=g)
    ids[0, 7:] = 0  # a padded row
    ts = torch.cumsum(torch.randint(1, 10_000, (B, n), generator=g), 1)
    qts = torch.cat([ts[:, 1:], ts[:, -1:] + 50], 1)
    return ids, ts, qts


def cfg_for(name, **kw):
    base = dict(name=name, dim=16, num_layers=2, num_heads=2, qk_dim=4, v_dim=4, ffn_dim=16, dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


def check_causal(model):
    model.eval()
    ids, ts, qts = batch()
    out = model(ids, ts, qts)
    ids2, ts2, qts2 = ids.clone(), ts.clone() + 0, qts.clone()
    ids2[:, 5:] = (ids2[:, 5:] % I) + 1
    ts2[:, 5:] += 777
    qts2[:, 5:] += 777
    out2 = model(ids2, ts2, qts2)
    torch.testing.assert_close(out[:, :5], out2[:, :5])
    assert not torch.allclose(out[1:, 5:], out2[1:, 5:])


def check_backward(model):
    model.train()
    out = model(*batch())
    loss = (out[..., :1] ** 2).sum() + (model.item_vectors()[:, :1] ** 2).sum()
    aux = model.aux_loss()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None and "stream_emb" not in n]
    assert not missing, missing
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


@pytest.mark.parametrize("name", ["fuxi-alpha", "hstu", "sasrec", "llama"])
def test_baselines_forward_backward_causal(name):
    torch.manual_seed(0)
    model = build_model(cfg_for(name), I, N)
    out = model(*batch())
    assert out.shape == (3, 10, 16)
    check_backward(model)
    check_causal(model)


MME_OPTIONS = list(
    itertools.product(
        [1, 2, 4],  # M
        [True, False],  # shared decoder
        ["concat", "mean"],
        [0, 4],  # experts
        ["ffn", "u", "out"],
    )
)


@pytest.mark.parametrize("M,shared,combine,E,placement", [o for o in MME_OPTIONS if o[3] or o[4] == "ffn"])
def test_fuxi_mme_option_combinations(M, shared, combine, E, placement):
    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=E,
        top_k=2,
        placement=placement,
        shared_expert=(M == 2),
        router_noise=0.1 if M == 4 else 0.0,
        stream_embedding=(M > 1),
        balance="aux_free" if placement == "u" else "aux_loss",
    )
    cfg = cfg_for(
        "fuxi-mme", num_embeddings=M, shared_decoder=shared, combine=combine, moe=moe, qk_dim=4, v_dim=4, num_heads=1, shared_positions=(M == 4)
    )
    model = build_model(cfg, I, N)
    out = model(*batch())
    assert out.shape == (3, 10, 16)
    items = model.item_vectors()
    assert items.shape == (I + 1, 16)
    scores = out @ items.T
    assert scores.abs().max() <= 1.0 + 1e-5  # concat: a cosine; mean: a mean of cosines
    if combine == "mean" and M > 1:
        # equals the mean over streams of per-stream cosine scores
        D = 16 // M
        per = [torch.nn.functional.normalize(model.item_embs[m].weight, dim=-1, eps=1e-6) for m in range(M)]
        u = out.view(3, 10, M, D) * M
        want = sum(u[..., m, :] @ per[m].T for m in range(M)) / M
        torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    if E:
        assert model.aux_loss() is not None or moe.balance == "aux_free"
        stats = model.router_stats()
        assert any(k.endswith("/load") for k in stats)
        load = next(v for k, v in stats.items() if k.endswith("/load"))
        assert load.shape == (E,) and abs(float(load.sum()) - 1.0) < 1e-5
    check_backward(model)
    check_causal(model)


def test_mme_with_one_embedding_and_no_moe_is_exactly_fuxi_alpha():
    torch.manual_seed(0)
    fa = FuxiAlpha(cfg_for("fuxi-alpha"), I, N)
    mme = FuxiMME(cfg_for("fuxi-mme", num_embeddings=1), I, N)
    sd = {}
    for k, v in fa.state_dict().items():
        k = k.replace("input.item_emb.", "item_embs.0.").replace("input.pos_emb.", "pos_embs.0.")
        sd[k] = v
    mme.load_state_dict(sd)  # strict: the parameters map one to one
    ids, ts, qts = batch()
    fa.eval(), mme.eval()
    torch.testing.assert_close(mme(ids, ts, qts), fa(ids, ts, qts), rtol=0, atol=0)
    torch.testing.assert_close(mme.item_vectors(), fa.item_vectors(), rtol=0, atol=0)
    # in training mode too (same dropout draws for the same seed)
    fa.train(), mme.train()
    torch.manual_seed(5)
    a = fa(ids, ts, qts)
    torch.manual_seed(5)
    b = mme(ids, ts, qts)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mme_keeps_the_embedding_size():
    fa = FuxiAlpha(cfg_for("fuxi-alpha"), I, N)
    mme = FuxiMME(cfg_for("fuxi-mme", num_embeddings=4), I, N)
    assert sum(e.weight.numel() for e in mme.item_embs) == fa.input.item_emb.weight.numel()


def test_cpu_dropout_keeps_the_distribution_and_scaling():
    from fuxi_mme.models.common import Dropout

    torch.manual_seed(0)
    d = Dropout(0.2)
    x = torch.ones(200_000, requires_grad=True)
    y = d(x)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.2) < 0.01 and torch.allclose(y[y != 0], torch.tensor(1.25))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask * scale
    d.eval()
    assert torch.equal(d(x), x)


def test_fuxi_block_streams_sharing_one_bucket_map_equal_repeated_maps():
    """Fuxi-MME's shared decoder runs its M streams as extra heads of one sequence, so the
    temporal and positional maps are built once per sequence: the same outputs and gradients as
    giving every stream its own copy of the bucket map."""
    from fuxi_mme.models.fuxi_alpha import FuxiBlock

    torch.manual_seed(0)
    blk = FuxiBlock(dim=16, num_heads=2, qk_dim=8, v_dim=8, ffn_multiply=1.0, dropout=0.0, max_len=12)
    B, M, N = 3, 2, 12
    x = torch.randn(B * M, N, 16, requires_grad=True)
    buckets = torch.randint(0, 129, (B, N, N))
    out = []
    for groups, bk in ((M, buckets), (1, buckets.repeat_interleave(M, 0))):
        blk.zero_grad()
        x.grad = None
        y = blk(x, bk, groups=groups)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out.append((y.detach(), x.grad.clone(), blk.time_w.grad.clone(), blk.pos_w.grad.clone(), blk.uvqk.weight.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["hstu", "fuxi-mme"])
def test_attention_norm_reaches_every_pointwise_attention(name):
    """model.attention_norm changes HSTU's and Fuxi-MME's outputs as it does FuXi-alpha's (there
    tested against the padded length); equal to max_len it is the same model."""
    torch.manual_seed(0)
    spec = build_model(cfg_for(name), I, N).eval()
    for norm, same in ((float(N), True), (2.0, False)):
        other = build_model(cfg_for(name, attention_norm=norm), I, N).eval()
        other.load_state_dict(spec.state_dict())
        assert same == torch.allclose(spec(*batch()), other(*batch()))
