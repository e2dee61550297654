"""The eager step's length-sorted chunks (``train.length_chunks``): the same loss and gradients
as the single full-width pass, less padding, and the settings that refuse it."""

import pytest
import torch

from conftest import tiny_config
from fuxi_mme.config import ConfigError, validate
from fuxi_mme.data import load_dataset
from fuxi_mme.models import build_model
from fuxi_mme.train.loop import Trainer, length_chunks


def first_step(model: str, chunks: int, **over):
    cfg = tiny_config(model, **{"train.length_chunks": chunks, "model.dropout": 0.0, "data.max_len": 80, **over})
    ds = load_dataset(cfg.data)
    torch.manual_seed(0)
    tr = Trainer(cfg, ds, build_model(cfg.model, ds.num_items, cfg.data.max_len), torch.device("cpu"), None, progress=False)
    assert tr.length_chunks == chunks
    rows = tr._epoch_order(0)[: cfg.train.batch_size]
    assert tr.train_arrs.lengths[rows].min() < tr.train_arrs.lengths[rows].max()  # chunks really differ in width
    loss, aux = tr.forward_backward(rows)
    grads = {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}
    extra = {k: v.clone() for k, v in tr.model.router_stats().items()}
    if aux is not None:
        extra["aux_loss"] = aux.detach()
    extra.update({k: b.clone() for k, b in tr.model.named_buffers() if k.endswith("expert_bias")})
    return float(loss.detach()), grads, extra


@pytest.mark.parametrize(
    "model,over",
    [
        ("fuxi-alpha", {}),
        ("hstu", {}),
        ("sasrec", {}),
        ("llama", {}),
        ("fuxi-mme", {}),
        ("fuxi-mme", {"model.moe.balance": "aux_free"}),
        ("fuxi-alpha", {"train.loss": "full"}),
    ],
)
def test_chunked_step_equals_the_full_width_step(model, over):
    loss1, g1, x1 = first_step(model, 1, **over)
    loss4, g4, x4 = first_step(model, 4, **over)
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    # an MoE's aux loss, router statistics and aux-free bias: of the whole batch's routing
    assert x1.keys() == x4.keys() and (model != "fuxi-mme" or x1)
    for k in x1:
        # a token near a routing tie may flip expert under a different summation order: the
        # expert loads may differ by an assignment or two of the ~2,200 (4.6e-4 each)
        tol = {"rtol": 0, "atol": 1e-3} if k.endswith("/load") else {"rtol": 1e-4, "atol": 1e-5}
        torch.testing.assert_close(x4[k], x1[k], **tol, msg=k)
    assert g1.keys() == g4.keys()
    rel = 2e-4 if model == "fuxi-mme" else 1e-5  # that flipped token moves the router's gradient by ~1e-4
    for k in g1:
        torch.testing.assert_close(g4[k], g1[k], rtol=1e-4, atol=rel * g1[k].abs().max().item() + 1e-9, msg=k)


def test_auto_chunks_on_cpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert length_chunks(tiny_config("fuxi-alpha", **{"train.batch_size": 128}), cpu, False) == 6
    assert length_chunks(tiny_config("fuxi-alpha", **{"train.batch_size": 40}), cpu, False) == 2  # >= 16 rows a chunk
    assert length_chunks(tiny_config("fuxi-alpha"), cpu, True) == 1  # DDP: one pass per rank
    assert length_chunks(tiny_config("fuxi-alpha"), gpu, False) == 1
    assert length_chunks(tiny_config("fuxi-mme", **{"train.batch_size": 128}), cpu, False) == 6
    assert length_chunks(tiny_config("fuxi-alpha", **{"train.length_chunks": 2}), gpu, False) == 2


@pytest.mark.parametrize("value,model,msg", [("0", "fuxi-alpha", "at least 1"), ("two", "fuxi-alpha", "auto or a whole number")])
def test_bad_length_chunks_are_refused(value, model, msg):
    cfg = tiny_config(model)
    cfg.train.length_chunks = value
    with pytest.raises(ConfigError, match=msg):
        validate(cfg)
