"""State-space encoder (docs/models.md#state-space-encoder): the chunked scan and the mamba-ssm
kernel against the sequential reference (forward and backward, CPU and GPU); padding never
changes a real position; model.mixer=attention is exactly the model of before; the ssm model,
the hybrid and the ssm mixer train end to end on the demo data; the ssm model exports; bad
settings name their field."""

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fuxi_mme.cli import main
from fuxi_mme.config import ConfigError, ModelConfig, MoEConfig
from fuxi_mme.data import load_dataset
from fuxi_mme.models import build_model, ssm_scan
from fuxi_mme.models.ssm import SelectiveSSM
from fuxi_mme.models.ssm_scan import kernel_available, selective_scan, selective_scan_chunked, selective_scan_reference
from fuxi_mme.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


def scan_inputs(Bsz, N, Di, S, dtype=torch.float64, device="cpu", dt_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    dt = torch.rand(Bsz, N, Di, generator=g, dtype=dtype) * dt_scale
    args = [r(Bsz, N, Di), dt, -torch.rand(Di, S, generator=g, dtype=dtype) * 3, r(Bsz, N, S), r(Bsz, N, S), r(Di)]
    return [a.to(device).requires_grad_(True) for a in args]


def value_and_grads(fn, args, seed=1):
    y = fn(*args)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)
    return y, torch.autograd.grad(y, args, g)


@pytest.mark.parametrize("N,chunk", [(1, 4), (7, 4), (37, 8), (64, 16), (130, 64)])
def test_chunked_scan_equals_the_sequential_reference(N, chunk):
    args = scan_inputs(2, N, 6, 5)
    y0, g0 = value_and_grads(selective_scan_reference, args)
    y1, g1 = value_and_grads(lambda *a: selective_scan_chunked(*a, chunk=chunk), args)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("u dt A B C D".split(), g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_chunked_scan_stays_finite_with_huge_steps_in_fp32():
    # only products of decays are formed: steps of 50 (decays of exp(-150) per position) cannot overflow
    args = scan_inputs(2, 96, 4, 3, dtype=torch.float32, dt_scale=50.0)
    y0, g0 = value_and_grads(selective_scan_reference, args)
    y1, g1 = value_and_grads(lambda *a: selective_scan_chunked(*a, chunk=32), args)
    assert torch.isfinite(y1).all() and all(torch.isfinite(g).all() for g in g1)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while ``fn()`` runs."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("N,chunk", [(256, 64), (100, 16)])
def test_the_chunked_scan_keeps_only_its_inputs_for_backward(N, chunk):
    # memory grows with B * N * Di, not B * N * Di * S per doubling level (about 340 B*N*Di
    # fp32 values for the scan and 350 for the whole mixer at d 64, S 16, chunk 64 before)
    torch.manual_seed(0)
    mix = SelectiveSSM(64, state=16, scan="chunked", chunk=chunk)
    x, valid = torch.randn(4, N, 64, requires_grad=True), torch.ones(4, N, dtype=torch.bool)
    unit = 4 * N * mix.Di * 4  # B * N * Di fp32 values
    assert saved_bytes(lambda: mix(x, valid)) < 12 * unit
    u, dt, A, B, C, D = scan_inputs(4, N, mix.Di, 16, dtype=torch.float32)
    assert saved_bytes(lambda: selective_scan_chunked(u, dt, A, B, C, D, chunk=chunk)) < 2.5 * unit


def test_chunked_scan_in_slices_of_rows_equals_the_reference(monkeypatch):
    monkeypatch.setattr(ssm_scan, "ROWS_ELEMENTS", 1000)  # 5 rows of 40 x 6 x 5: one row per slice
    args = scan_inputs(5, 37, 6, 5)
    assert len(ssm_scan._row_slices(args[0], 5, 8)) == 5
    y0, g0 = value_and_grads(selective_scan_reference, args)
    y1, g1 = value_and_grads(lambda *a: selective_scan_chunked(*a, chunk=8), args)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", ["chunked", "kernel"])
def test_gpu_scans_equal_the_reference(how):
    if how == "kernel" and not kernel_available():
        pytest.skip("mamba-ssm is not installed")
    args = scan_inputs(3, 300, 32, 16, dtype=torch.float32, device="cuda", dt_scale=0.5)
    y0, g0 = value_and_grads(selective_scan_reference, args)
    y1, g1 = value_and_grads(lambda *a: selective_scan(*a, how=how, chunk=64), args)
    torch.testing.assert_close(y1, y0, rtol=2e-3, atol=2e-3)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3 * float(b.abs().max()))


def test_scan_dispatch_and_the_missing_kernel():
    args = [a.detach().float() for a in scan_inputs(1, 5, 2, 2)]
    torch.testing.assert_close(selective_scan(*args, how="auto"), selective_scan_reference(*args))
    if not kernel_available():
        with pytest.raises(RuntimeError, match="mamba-ssm"):
            selective_scan(*args, how="kernel")


def ssm_model(name="ssm", **over):
    torch.manual_seed(0)
    fields = dict(name=name, dim=16, qk_dim=8, v_dim=8, num_heads=2, dropout=0.0, ssm_chunk=8, ssm_scan="chunked")
    fields.update(over)
    return build_model(ModelConfig(**fields), 40, 24).eval()


def histories(lengths, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 41, (len(lengths), N), generator=g)
    for r, n in enumerate(lengths):
        ids[r, n:] = 0
    ts = torch.cumsum(torch.randint(1, 5000, ids.shape, generator=g), 1) * (ids != 0)
    return ids, ts, ts.roll(-1, 1)


@pytest.mark.parametrize("scan", ["reference", "chunked"])
def test_padding_never_changes_a_real_position(scan):
    m = ssm_model(ssm_scan=scan)
    ids, ts, q = histories([11, 4, 1, 17], 17)
    with torch.no_grad():
        batch = m(ids, ts, q)
        wider = m(*(torch.nn.functional.pad(t, (0, 7)) for t in (ids, ts, q)))  # more padding after
        for r, n in enumerate([11, 4, 1, 17]):
            alone = m(ids[r : r + 1, :n], ts[r : r + 1, :n], q[r : r + 1, :n])  # each row alone, unpadded
            torch.testing.assert_close(batch[r, :n], alone[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(wider[r, :n], alone[0], rtol=1e-5, atol=1e-6)
            # left padding too: no positional table, and the mixer zeroes padded inputs and steps
            left = m(*(torch.nn.functional.pad(t[r : r + 1, :n], (17 - n, 0)) for t in (ids, ts, q)))
            torch.testing.assert_close(left[0, 17 - n :], alone[0], rtol=1e-5, atol=1e-6)


def test_the_mixer_keeps_the_conv_bias_and_d_term_out_of_left_padding():
    torch.manual_seed(0)
    mix = SelectiveSSM(8, state=4, conv=4, expand=2, scan="reference").double()
    with torch.no_grad():
        mix.conv.bias.fill_(0.7)  # silu(bias) would leak through the scan if padded inputs were not zeroed
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    padded = torch.cat([torch.randn(2, 5, 8, dtype=torch.float64), x], 1)  # garbage in the padding
    valid = torch.arange(11)[None].expand(2, 11) >= 5
    out = mix(padded, valid)
    torch.testing.assert_close(out[:, 5:], mix(x, torch.ones(2, 6, dtype=torch.bool)))


def fill_deterministically(m):
    """Every parameter a fixed function of its name and index (no RNG: random initialisation
    differs between torch versions, these values do not)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            k = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((0.5 * torch.sin(0.37 * k + zlib.crc32(name.encode()) % 1000 / 100)).view(p.shape))
    return m


# Computed with the code before model.mixer existed (commit 35cf814, the same fill and inputs):
# the state_dict keys and output sums. mixer=attention must build and compute exactly that.
BEFORE = {
    "fuxi-alpha": (18, [-3.142957, -3.768235, -4.020988], 108.12369, {}),
    "fuxi-mme-moe": (24, [1.258815, 0.500206, -0.137172], 104.71331, dict(num_embeddings=2, moe=MoEConfig(num_experts=3))),
    "fuxi-mme-streams": (36, [-0.940305, 4.896955, -3.059461], 104.72906, dict(num_embeddings=2, shared_decoder=False)),
}
FUXI_ALPHA_KEYS = ["input.item_emb.weight", "input.pos_emb.weight"]


@pytest.mark.parametrize("case", list(BEFORE))
def test_attention_mixer_is_the_model_of_before(case):
    n_keys, sums, abs_sum, extra = BEFORE[case]
    pos = torch.arange(30).view(3, 10)  # fixed inputs too (no generator)
    ids = (pos * 7 + 3) % 40 + 1
    ids[1, 6:] = 0
    ids[2, 1:] = 0
    ts = torch.cumsum((pos * 613) % 4999 + 1, 1) * (ids != 0)
    cfg = ModelConfig(name=case.split("-moe")[0].split("-streams")[0], dim=16, qk_dim=8, v_dim=8, num_heads=2, dropout=0.0, **extra)
    assert cfg.mixer == "attention"
    m = fill_deterministically(build_model(cfg, 40, 10).eval())
    keys = list(m.state_dict())
    assert len(keys) == n_keys and not any("ssm" in k for k in keys)
    if case == "fuxi-alpha":
        assert [k for k in keys if not k.startswith("blocks.")] == FUXI_ALPHA_KEYS
        block_keys = {"pos_w", "time_w", "uvqk.weight", "out.weight", "out.bias", "ffn.w1.weight", "ffn.w3.weight", "ffn.w2.weight"}
        assert {k.split(".", 2)[2] for k in keys if k.startswith("blocks.")} == block_keys
    with torch.no_grad():
        out = m(ids, ts, ts.roll(-1, 1))
    assert out[:, :, :3].sum((0, 1)).tolist() == pytest.approx(sums, abs=1e-4)
    assert float(out.abs().sum()) == pytest.approx(abs_sum, abs=1e-3)


@pytest.mark.parametrize("name", ["fuxi-alpha", "fuxi-mme"])
def test_hybrid_adds_ssm_blocks_and_ssm_replaces_the_fuxi_blocks(name):
    base = set(ssm_model(name, mixer="attention").state_dict())
    hybrid = set(ssm_model(name, mixer="hybrid").state_dict())
    assert base < hybrid and all(k.startswith("ssm_blocks.") for k in hybrid - base)
    assert {k.split(".")[1] for k in hybrid - base} == {"0", "1"}  # one after each of the 2 FuXi blocks
    ssm = set(ssm_model(name, mixer="ssm").state_dict())
    assert not any("uvqk" in k or "pos_w" in k for k in ssm) and any(k.startswith("blocks.0.mixer.") for k in ssm)
    for mixer in ("ssm", "hybrid"):
        m = ssm_model(name, mixer=mixer)
        ids, ts, q = histories([9, 3], 9)
        with torch.no_grad():
            full = m(ids, ts, q)
            part = m(ids[:, :5], ts[:, :5], q[:, :5])
        torch.testing.assert_close(full[:, :3], part[:, :3], rtol=1e-5, atol=1e-6)  # causal


def loss_falls(cfg, steps=30):
    torch.manual_seed(0)
    ds = load_dataset(cfg.data)
    net = build_model(cfg.model, ds.num_items, cfg.data.max_len)
    tr = Trainer(cfg, ds, net, torch.device("cpu"), None, progress=False)
    rows, losses = np.arange(64), []
    for _ in range(steps):
        loss, aux = tr.loss_for_rows(rows)
        (loss + (aux if aux is not None else 0)).backward()
        tr.opt.step()
        tr.opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "over",
    [
        {"model.name": "ssm"},
        {"model.name": "fuxi-alpha", "model.mixer": "hybrid"},
        {"model.name": "fuxi-mme", "model.mixer": "ssm", "model.num_embeddings": 2, "model.moe.num_experts": 2},
        {"model.name": "fuxi-mme", "model.mixer": "hybrid", "model.num_embeddings": 2, "model.moe.num_experts": 2},
    ],
    ids=["ssm", "fuxi-alpha-hybrid", "fuxi-mme-ssm-moe", "fuxi-mme-hybrid-moe"],
)
def test_state_space_models_learn_on_the_demo_data(over):
    losses = loss_falls(tiny_config("fuxi-alpha", **over))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_cli_trains_the_ssm_model_end_to_end_and_exports_it(tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["model.name=ssm", "data.demo_users=150", "data.max_len=12", "model.dim=8", "model.ssm_chunk=4"]
    args = ["train", "--dataset", "demo", "--run-dir", str(run), "--epochs", "2", "--no-progress", "--device", "cpu"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "ssm on demo" in out and "NDCG@10" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.dumps(metrics).count("NaN") == 0
    assert main(["export", str(run), str(tmp_path / "exp"), "--no-aoti", "--no-onnx"]) == 0
    from fuxi_mme.serve import Recommender
    from fuxi_mme.serve.export import load_exported

    rec, served = Recommender.from_run(run, device="cpu"), load_exported(tmp_path / "exp")
    qs = [rec.history_of(u) for u in rec.ds.user_raw[:4]]
    for q in qs:
        q.k = 5
    for w, g in zip(rec.recommend(qs), served.recommend(qs)):
        assert [x["item"] for x in g["items"]] == [x["item"] for x in w["items"]]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("mixer", "mamba", "model.mixer='mamba' is not one of attention, ssm, hybrid"),
        ("ssm_scan", "fast", "model.ssm_scan='fast' is not one of"),
        ("ssm_state", 0, "model.ssm_state=0 must be at least 1"),
        ("ssm_chunk", 48, "model.ssm_chunk=48 must be a power of two"),
        ("ssm_dt_rank", -1, "model.ssm_dt_rank=-1"),
    ],
)
def test_bad_settings_name_their_field(field, value, message):
    for name in ("ssm", "fuxi-alpha"):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            build_model(ModelConfig(name=name, **{field: value}), 10, 8)


def test_moe_outside_the_ffn_needs_attention_blocks():
    cfg = ModelConfig(name="fuxi-mme", dim=16, num_embeddings=2, mixer="ssm", moe=MoEConfig(num_experts=2, placement="u"))
    with pytest.raises(ConfigError, match="model.moe.placement='u' needs attention blocks"):
        build_model(cfg, 10, 8)


def test_length_scaling_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "ls"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "length_scaling.py"), "--device", "cpu", "--quick", "--lengths", "16,32", "--out", str(out)]
    cmd += ["--tokens", "256", "--dim", "16", "--models", "sasrec,fuxi-alpha,ssm,fuxi-alpha-hybrid"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["config"]["tokens"] == 256 and res["config"]["lengths"] == [16, 32]
    rows = {(r["model"], r["length"]): r for r in res["rows"]}
    assert set(rows) == {(m, n) for m in ("sasrec", "fuxi-alpha", "ssm", "fuxi-alpha-hybrid") for n in (16, 32)}
    for (_, n), r in rows.items():
        assert r["fits"] and r["batch"] == 256 // n
        assert r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s"] > 0 and r["params"] > 0
    assert {m: r["scan"] for (m, _), r in rows.items()} == {"sasrec": None, "fuxi-alpha": None, "ssm": "reference", "fuxi-alpha-hybrid": "reference"}
    assert "commit" in res and res["versions"]["torch"] and res["device"]["device"] == "cpu"
    assert "| model | scan |" in out.with_suffix(".md").read_text()
