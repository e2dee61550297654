import math

import pytest
import torch
import torch.nn.functional as F

from fuxi_mme.config import ModelConfig
from fuxi_mme.models.attention import fuxi_attention_reference
from fuxi_mme.models.common import time_bucket
from fuxi_mme.models.fuxi_alpha import FuxiAlpha
from fuxi_mme.presets import build_preset


def test_ml1m_base_block_weight_count():
    cfg = build_preset("ml-1m-fuxi-alpha-base")
    model = FuxiAlpha(cfg.model, num_items=3706, max_len=200)
    blocks = sum(p.numel() for n, p in model.blocks.named_parameters() if not n.endswith(("pos_w", "time_w")))
    assert blocks == 2 * (15_000 + 7_550 + 7_500) == 60_100
    scalars = sum(p.numel() for n, p in model.blocks.named_parameters() if n.endswith(("pos_w", "time_w")))
    assert scalars == 2 * (200 + 129)
    blk = model.blocks[0]
    assert blk.uvqk.weight.shape == (300, 50) and blk.uvqk.bias is None
    assert blk.out.weight.shape == (50, 150) and blk.out.bias.shape == (50,)
    assert model.input.item_emb.weight.shape == (3707, 50)


@pytest.mark.parametrize(
    "dt, bucket",
    # floor(ln(max(|x|, 1)) / 0.301), clipped to [0, 128]: worked out by hand
    [(0, 0), (1, 0), (-1, 0), (2, 2), (10, 7), (60, 13), (3600, 27), (-3600, 27), (86400, 37), (86400 * 365, 57), (2**62, 128)],
)
def test_temporal_bucketing_known_gaps(dt, bucket):
    assert time_bucket(torch.tensor([dt])).item() == bucket


def test_attention_matches_elementwise_definition():
    torch.manual_seed(0)
    B, H, N, D = 2, 2, 5, 3
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    pos_w, time_w = torch.randn(N), torch.randn(129)
    ts = torch.tensor([[0, 5, 100, 4000, 90000], [1, 2, 3, 4, 5]])
    qts = torch.tensor([[5, 100, 4000, 90000, 10**7], [2, 3, 4, 5, 6]])
    buckets = time_bucket(qts[:, :, None] - ts[:, None, :])
    out = fuxi_attention_reference(q, k, v, pos_w, time_w, buckets, norm=7.0)
    want = torch.zeros(B, N, 3 * H * D)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(i + 1):
                    sem = F.silu(q[b, h, i] @ k[b, h, j]) / 7.0
                    tb = min(128, math.floor(math.log(max(abs(int(qts[b, i] - ts[b, j])), 1)) / 0.301))
                    want[b, i, h * D : (h + 1) * D] += sem * v[b, h, j]
                    want[b, i, (H + h) * D : (H + h + 1) * D] += pos_w[i - j] * v[b, h, j]
                    want[b, i, (2 * H + h) * D : (2 * H + h + 1) * D] += time_w[tb] * v[b, h, j]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def tiny_model(**kw):
    cfg = ModelConfig(name="fuxi-alpha", dim=16, num_layers=2, num_heads=2, qk_dim=8, v_dim=8, dropout=0.0, **kw)
    return FuxiAlpha(cfg, num_items=30, max_len=12).eval()


def batch(B=3, N=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 31, (B, N), generator=g)
    ts = torch.cumsum(torch.randint(1, 10_000, (B, N), generator=g), 1)
    qts = torch.cat([ts[:, 1:], ts[:, -1:] + 50], 1)
    return ids, ts, qts


def test_causal_later_items_never_change_earlier_outputs():
    torch.manual_seed(0)
    model = tiny_model()
    ids, ts, qts = batch()
    out = model(ids, ts, qts)
    for t in (3, 7):
        ids2, ts2, qts2 = ids.clone(), ts.clone(), qts.clone()
        ids2[:, t:] = torch.randint(1, 31, ids2[:, t:].shape)
        ts2[:, t:] += 12345
        qts2[:, t:] += 12345  # query time of positions >= t (the future) changes too
        out2 = model(ids2, ts2, qts2)
        torch.testing.assert_close(out[:, :t], out2[:, :t])
        assert not torch.allclose(out[:, t:], out2[:, t:])


def test_padding_after_the_sequence_does_not_change_it():
    torch.manual_seed(0)
    model = tiny_model()
    ids, ts, qts = batch(N=6)
    pad = torch.zeros(3, 4, dtype=torch.long)
    out = model(ids, ts, qts)
    out_p = model(torch.cat([ids, pad], 1), torch.cat([ts, pad], 1), torch.cat([qts, pad], 1))
    torch.testing.assert_close(out, out_p[:, :6])


def test_temporal_channel_reads_query_time():
    torch.manual_seed(0)
    model = tiny_model()
    ids, ts, qts = batch()
    out = model(ids, ts, qts)
    qts2 = qts.clone()
    qts2[:, -1] += 10**6  # a longer gap before the target
    out2 = model(ids, ts, qts2)
    torch.testing.assert_close(out[:, :-1], out2[:, :-1])
    assert not torch.allclose(out[:, -1], out2[:, -1])
    off = tiny_model(use_temporal=False)
    off.load_state_dict(model.state_dict())
    torch.testing.assert_close(off(ids, ts, qts), off(ids, ts, qts2))


def test_outputs_and_items_are_unit_vectors():
    model = tiny_model()
    out = model(*batch())
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(out.shape[:2]))
    items = model.item_vectors()
    torch.testing.assert_close(items[1:].norm(dim=-1), torch.ones(30))


def test_small_table_lookup_matches_indexing_values_and_gradients():
    from fuxi_mme.models.attention import lookup

    table = torch.randn(129, requires_grad=True)
    idx = torch.randint(0, 129, (4, 30, 30))
    w = torch.randn(4, 30, 30)
    (lookup(table, idx) * w).sum().backward()
    g1 = table.grad.clone()
    table.grad = None
    (table[idx] * w).sum().backward()
    torch.testing.assert_close(g1, table.grad)
    torch.testing.assert_close(lookup(table, idx), table[idx])


def test_integer_bucketing_equals_the_float64_formula():
    """The threshold count used for integer gaps agrees with floor(ln(x) / 0.301) everywhere
    we can check: every gap up to 2 million seconds, and each threshold below 10**12 s (32,000
    years) and its neighbours. Beyond ~10**13 s the float64 logarithm itself is off by a bucket
    near some thresholds; the integer count is the exact one there."""
    import math

    def formula(x):
        return torch.floor(torch.log(x.abs().clamp(min=1).to(torch.float64)) / 0.301).clamp(0, 128).long()

    x = torch.arange(-2_000_000, 2_000_000)
    assert torch.equal(time_bucket(x), formula(x))
    t = torch.tensor([math.ceil(math.exp(0.301 * b)) for b in range(1, 92)])
    assert t[-1] < 10**12
    edges = torch.cat([t - 1, t, t + 1])
    assert torch.equal(time_bucket(edges), formula(edges))
    assert time_bucket(torch.tensor([2.5, -100.0])).tolist() == formula(torch.tensor([2.5, -100.0])).tolist()


def test_attention_norm_replaces_the_padded_length():
    """model.attention_norm = 0 divides the semantic channel by the padded length (docs/models.md#attention-channels); a
    positive value divides by itself instead: equal to max_len it is the same model, otherwise
    the outputs change; a negative value is refused with the fix."""
    from fuxi_mme.config import Config, ConfigError, validate

    torch.manual_seed(0)
    spec = tiny_model()
    ids, ts, qts = batch()
    same = tiny_model(attention_norm=float(spec.max_len))
    same.load_state_dict(spec.state_dict())
    torch.testing.assert_close(spec(ids, ts, qts), same(ids, ts, qts))
    short = tiny_model(attention_norm=2.0)
    short.load_state_dict(spec.state_dict())
    assert all(b.norm == 2.0 for b in short.blocks) and all(b.norm == spec.max_len for b in spec.blocks)
    assert not torch.allclose(spec(ids, ts, qts), short(ids, ts, qts))
    cfg = Config()
    cfg.model.attention_norm = -1.0
    with pytest.raises(ConfigError, match="attention_norm"):
        validate(cfg)
