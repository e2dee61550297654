"""GPU-only checks (skipped without CUDA): the grouped-GEMM MoE path against the loop
reference, and a bf16 training step of each model."""

import pytest
import torch

from fuxi_mme.models.moe import MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["swiglu", "linear"])
@pytest.mark.parametrize("E,K", [(4, 2), (8, 1), (4, 4)])
def test_grouped_gemm_matches_loop_reference_in_bf16(kind, E, K):
    torch.manual_seed(0)
    moe = MoE(64, 64, E, K, kind=kind, hidden=128, bias=(kind == "linear")).cuda()
    x = torch.randn(4096, 64, device="cuda")
    x[:512] += 4.0  # skewed routing, some experts busier than others
    outs, paths = [], []
    for backend in ("loop", "batched"):
        moe.backend = backend
        moe.zero_grad()
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(xx)
        y.float().square().mean().backward()
        paths.append(moe.last_path)
        outs.append((y.float(), xx.grad.float(), moe.router.weight.grad.float(), (moe.w1 if kind == "swiglu" else moe.w).grad.float()))
    assert paths == ["loop", "grouped"]  # the fast path really ran
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_grouped_gemm_with_idle_experts():
    torch.manual_seed(0)
    moe = MoE(64, 64, 4, 1, kind="swiglu", hidden=128).cuda()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] += 1.0
    x = torch.rand(1024, 64, device="cuda") + 0.1  # every token to expert 2; experts 0, 1, 3 get none
    outs = []
    for backend in ("loop", "batched"):
        moe.backend = backend
        moe.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(x)
        y.float().sum().backward()
        outs.append((y.float(), moe.w1.grad.float()))
    assert moe.last_path == "grouped"
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2e-2, atol=2e-2 * outs[0][1].abs().max().item())
    assert outs[1][1][[0, 1, 3]].abs().sum() == 0
