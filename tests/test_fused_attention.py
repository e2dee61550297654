"""Fused Triton attention against the PyTorch reference: values and gradients of q, k, v,
pos_w and time_w, FuXi-alpha's three channels and HSTU, with and without the temporal
channel, on shapes that are not multiples of the block sizes.

Runs on a CUDA GPU (fp32 and bf16), or on the CPU in Triton's interpreter when triton is
installed (``TRITON_INTERPRET=1`` is set here); skipped without triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are defined (at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fuxi_mme.models.attention import fuxi_attention_reference, hstu_attention_reference

fa = pytest.importorskip("fuxi_mme.models.attention.fused")
if not fa.HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()


def _inputs(B, H, N, DQ, DV, L, dtype, seed, time=True):
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if CUDA else "cpu"
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dev, dtype).requires_grad_(True)  # noqa: E731
    q, k, v = mk(B, H, N, DQ), mk(B, H, N, DQ), mk(B, H, N, DV)
    pos_w = (torch.randn(L, generator=g) * 0.1).to(dev).requires_grad_(True)
    time_w = (torch.randn(129, generator=g) * 0.1).to(dev).requires_grad_(True)
    buckets = torch.randint(0, 129, (B, N, N), generator=g).to(dev) if time else None
    return q, k, v, pos_w, time_w, buckets


SHAPES = [(1, 1, 1, 8, 8), (2, 2, 17, 8, 16), (2, 1, 40, 25, 25), (1, 3, 33, 16, 8)]
# FuXi-alpha with its bias channels in the kernels, FuXi-alpha with them as products outside
# (fused_attention.BIAS_CHANNELS = "matmul"), HSTU
KINDS = ["fuxi", "fuxi-split", "hstu"]


def _fns(kind):
    if kind == "hstu":
        return hstu_attention_reference, fa.fused_hstu_attention
    return fuxi_attention_reference, (lambda *a: fa.fused_fuxi_attention(*a, split=kind == "fuxi-split"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("time", [True, False], ids=["time", "no-time"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{s[0]}H{s[1]}N{s[2]}q{s[3]}v{s[4]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else []), ids=lambda d: str(d).split(".")[-1])
def test_fused_matches_reference(kind, time, shape, dtype):
    B, H, N, DQ, DV = shape
    L = 48
    ref_fn, fused_fn = _fns(kind)
    args = _inputs(B, H, N, DQ, DV, L, dtype, seed=N * 7 + H, time=time)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = fused_fn(*args, float(L))
    ref = ref_fn(*ref_args, float(L))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    names = ["q", "k", "v", "pos_w", "time_w"]
    exact = None
    if dtype != torch.float32:
        # the tables' gradients sum thousands of bf16-rounded terms, in a different order on each
        # path: both are held to the fp32 result on the same inputs, the fused one no further
        # from it than twice the bf16 reference's own distance (plus a small floor)
        exact = [a.detach().float().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        (ref_fn(*exact, float(L)) * g.float()).sum().backward()
    for i, (name, a, r) in enumerate(zip(names, args[:5], ref_args[:5])):
        if name == "time_w" and not time:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0
            continue
        assert a.grad is not None, name
        if name in ("q", "k", "v"):
            torch.testing.assert_close(a.grad.float(), r.grad.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")
        elif exact is None:
            torch.testing.assert_close(a.grad.float(), r.grad.float(), rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        else:
            truth = exact[i].grad
            err_fused = (a.grad.float() - truth).abs().max().item()
            err_ref = (r.grad.float() - truth).abs().max().item()
            assert err_fused <= 2 * err_ref + 1e-2 * truth.abs().max().item(), (name, err_fused, err_ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("shape", [(3, 2, 37, 16, 16), (4, 4, 20, 8, 32)], ids=["B3H2N37", "B4H4N20"])
def test_fused_skips_padding_and_matches_reference_with_lengths(kind, groups, shape):
    """Sequences padded after their items (``lengths``): the kernels skip padding's tiles; the
    real rows equal the reference's with or without lengths, padding rows are zero, and every
    gradient (q, k, v, both tables) equals the reference's with lengths. One sequence is all
    padding, one has no padding. ``groups`` 2: the heads as two groups (Fuxi-MME's streams),
    each group's rows written whole by the kernels."""
    B, H, N, DQ, DV = shape
    ref_fn, fused_fn = _fns(kind)
    args = _inputs(B, H, N, DQ, DV, 48, torch.float32, seed=B * 11 + N)
    dev = args[0].device
    lengths = torch.tensor([N, 0, 13, 1][:B], device=dev)
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    out = fused_fn(*args, 48.0, lengths, groups)
    ref = ref_fn(*ref_args, 48.0, lengths, groups)
    assert out.shape == (B * groups, N, (1 if kind == "hstu" else 3) * H // groups * DV)
    rows = (torch.arange(N, device=dev)[None, :] < lengths[:, None]).repeat_interleave(groups, 0)
    with torch.no_grad():
        unmasked = ref_fn(*args, 48.0, None, groups)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref[rows], unmasked[rows])
    assert (out[~rows] == 0).all() and (ref[~rows] == 0).all()
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for name, a, r in zip(["q", "k", "v", "pos_w", "time_w"], args[:5], ref_args[:5]):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert (args[0].grad.transpose(1, 2)[~rows[::groups]] == 0).all()  # no gradient into padding's queries


@pytest.mark.parametrize(
    "model,bias", [("fuxi-alpha", "kernel"), ("fuxi-mme", "kernel"), ("hstu", "kernel"), ("fuxi-alpha", "matmul"), ("fuxi-mme", "matmul")]
)
def test_models_train_the_same_with_the_fused_kernel(model, bias, monkeypatch):
    """model.attention=fused: same loss and gradients as the reference on a tiny model (FuXi
    bias channels in the kernels or as products outside)."""
    monkeypatch.setattr(fa, "BIAS_CHANNELS", bias)
    import numpy as np

    from conftest import tiny_config
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.train.loop import Trainer

    grads = []
    for mode in ("reference", "fused"):
        cfg = tiny_config(model, **{"model.attention": mode, "data.demo_users": 40, "data.max_len": 24})
        if CUDA:
            cfg.train.device = "cuda"
        ds = load_dataset(cfg.data)
        torch.manual_seed(0)
        dev = torch.device(cfg.train.device)
        net = build_model(cfg.model, ds.num_items, cfg.data.max_len).to(dev)
        tr = Trainer(cfg, ds, net, dev, None, progress=False)
        loss, aux = tr.loss_for_rows(np.arange(8))
        (loss + (aux if aux is not None else 0)).backward()
        grads.append((float(loss), {n: p.grad.detach().cpu().clone() for n, p in net.named_parameters() if p.grad is not None}))
    (l_ref, g_ref), (l_fused, g_fused) = grads
    assert l_fused == pytest.approx(l_ref, rel=1e-5)
    assert g_ref.keys() == g_fused.keys()
    for n in g_ref:
        torch.testing.assert_close(g_fused[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_compiles_without_graph_breaks(kind):
    """The kernels are custom operators: ``torch.compile(fullgraph=True)`` compiles the code
    around them (no graph break into the Triton launches), with the reference's values and
    gradients."""
    B, H, N, DQ, DV, L = 2, 2, 20, 8, 8, 32
    ref_fn, fused_fn = _fns(kind)
    args = _inputs(B, H, N, DQ, DV, L, torch.float32, seed=3)
    bk = args[5]

    def loss(attend, q, k, v, pos_w, time_w):
        return attend(q * 1.5, k, v, pos_w, time_w, bk, float(L)).sin().sum()  # work around the kernel

    compiled = torch.compile(lambda *a: loss(fused_fn, *a), fullgraph=True)
    got = compiled(*args[:5])
    got.backward()
    grads = [a.grad.clone() for a in args[:5]]
    for a in args[:5]:
        a.grad = None
    want = loss(ref_fn, *args[:5])
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, g, a in zip(["q", "k", "v", "pos_w", "time_w"], grads, args[:5]):
        torch.testing.assert_close(g, a.grad, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


AOT_CHECK = """
import inspect, sys
import triton
from triton.compiler import ASTSource
try:
    from triton.backends.compiler import GPUTarget
except ImportError:
    sys.exit(77)
if "constexprs" not in inspect.signature(ASTSource).parameters:
    sys.exit(77)
from fuxi_mme.models.attention import fused as fa
pointers = {"Q", "K", "V", "DO", "O", "DK", "DVp", "DQp"}
for kern in (fa.fwd, fa.bwd_kv, fa.bwd_q):
    params = list(inspect.signature(kern.fn).parameters)
    for hstu, split, width in ((False, False, 64), (False, True, 64), (True, False, 64), (False, False, 32), (False, True, 32)):
        for dt in ("bf16", "fp32"):
            sig = {}
            for p in params:
                if p in pointers:
                    sig[p] = "*" + dt
                elif p == "TM":
                    sig[p] = "*" + dt
                elif p in ("PM", "GP"):
                    sig[p] = "*fp32"
                elif p == "LEN":
                    sig[p] = "*i64"
                elif p in ("H", "G", "N", "DQ", "DV"):
                    sig[p] = "i32"
                elif p == "inv_norm":
                    sig[p] = "fp32"
                else:
                    sig[p] = "constexpr"
            bm, bn, warps, stages = fa.LAUNCH[fa.launch_kind(hstu, split, width)][kern.fn.__name__]  # the settings used on GPU
            consts = dict(HSTU=hstu, BIAS_CH=not hstu and not split, BIAS=hstu or not split, USE_TIME=True, HAS_LEN=True, IEEE=dt == "fp32",
                          C=fa._channels(hstu, split), BM=bm, BN=bn, BDQ=width, BDV=width)
            k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            assert "cubin" in k.asm and k.metadata.shared <= 227 * 1024, (kern.fn.__name__, hstu, split, dt, k.metadata.shared)
            print(kern.fn.__name__, hstu, split, width, dt, k.metadata.shared)
"""


def test_kernels_compile_ahead_of_time_for_hopper():
    """No GPU needed: each kernel variant compiles to a cubin for sm_90 (H100/H200) at the
    launch settings used on GPU (``fused_attention.LAUNCH``) at head widths 64 and 32 (FuXi's
    narrow-head tables), within the
    227 KB of shared memory a block may use. Runs in a
    fresh process, since this one defined the kernels for the interpreter."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", AOT_CHECK], env=env, capture_output=True, text=True, timeout=600)
    if p.returncode == 77:
        pytest.skip("this triton version has another ahead-of-time compile API")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.splitlines()) == 30


@pytest.mark.parametrize("groups", [1, 2])
def test_table_gradients_the_same_in_deterministic_mode(groups):
    """FuXi-alpha's table gradients come from the ``bias_grad`` kernel (unordered atomic adds);
    with deterministic algorithms on, from the map gradients folded by ``small_table_grad``.
    Both equal the reference's, with padding and groups."""
    B, H, N, DQ, DV = 3, 4, 37, 16, 16
    lengths = torch.tensor([N, 0, 19])
    grads = []
    for deterministic in (False, True):
        args = _inputs(B, H, N, DQ, DV, 48, torch.float32, seed=5)
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = fa.fused_fuxi_attention(*args, 48.0, lengths.to(args[0].device), groups, split=False)
            (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)
        grads.append((args[3].grad, args[4].grad))
    args = _inputs(B, H, N, DQ, DV, 48, torch.float32, seed=5)
    ref = fuxi_attention_reference(*args, 48.0, lengths.to(args[0].device), groups)
    (ref * torch.linspace(-1, 1, ref.numel(), device=ref.device).view_as(ref)).sum().backward()
    for pos_g, time_g in grads:
        torch.testing.assert_close(pos_g, args[3].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(time_g, args[4].grad, rtol=1e-4, atol=1e-5)
