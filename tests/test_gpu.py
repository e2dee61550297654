"""GPU-only checks (skipped without CUDA): the grouped-GEMM MoE path against the loop
reference, and a bf16 training step of each model."""

import pytest
import torch

from fuxi_mme.models.moe import MoE, _grouped_mm_ok

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["swiglu", "linear"])
@pytest.mark.parametrize("E,K", [(4, 2), (8, 1), (4, 4)])
def test_grouped_gemm_matches_loop_reference_in_bf16(kind, E, K):
    torch.manual_seed(0)
    moe = MoE(64, 64, E, K, kind=kind, hidden=128, bias=(kind == "linear")).cuda()
    x = torch.randn(4096, 64, device="cuda")
    x[:512] += 4.0  # skewed routing, some experts busier than others
    assert _grouped_mm_ok(x.bfloat16(), *( (moe.w1, moe.w3, moe.w2) if kind == "swiglu" else (moe.w,) ))
    outs = []
    for backend in ("loop", "batched"):
        moe.backend = backend
        moe.zero_grad()
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(xx)
        y.float().square().mean().backward()
        outs.append((y.float(), xx.grad.float(), moe.router.weight.grad.float(), (moe.w1 if kind == "swiglu" else moe.w).grad.float()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
