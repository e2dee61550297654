"""The CUDA-graph step's bookkeeping, checked on CPU: static full-width buffers, target
positions padded to a bucket, negatives picked from the eager draws. A stand-in "graph" that
re-runs the recorded body on replay must give the eager step's losses and parameters (the
real capture is checked on a GPU in tests/test_gpu.py)."""

import numpy as np
import pytest
import torch

from conftest import epoch_losses_and_first_grads, tiny_config
from fuxi_mme.data import load_dataset
from fuxi_mme.models import build_model
from fuxi_mme.models.moe import MoE
from fuxi_mme.train import setup
from fuxi_mme.train.graphs import GraphedStep, graphs_wanted
from fuxi_mme.train.loop import Trainer


class ReplayEagerly(GraphedStep):
    """Records nothing: 'replay' runs the step function on the static batch."""

    def _capture(self, key, bufs):
        self.graphs[key] = (None, bufs, None)

    def _replay(self, key):
        return self.variants[0].fn(self.graphs[key][1], self.norm)


def cpu_trainer(model, **over) -> Trainer:
    cfg = tiny_config(model, **{"data.max_len": 80, "train.length_chunks": 1, **over})
    ds = load_dataset(cfg.data)
    torch.manual_seed(0)
    return Trainer(cfg, ds, build_model(cfg.model, ds.num_items, cfg.data.max_len), torch.device("cpu"), None, progress=False)


def run(model, graphed: bool, grad_accum=1, bucket=16, **over):
    tr = cpu_trainer(model, **{"train.grad_accum": grad_accum, **over})
    assert tr.graphed is None  # CPU: never graphs
    if graphed:
        tr.graphed = tr.make_graphed_step(ReplayEagerly)
        if bucket:
            tr.graphed.bucket = bucket  # several buckets in one epoch
    losses, grads = epoch_losses_and_first_grads(tr, grad_accum)
    return losses, grads, tr


@pytest.mark.parametrize("model,grad_accum", [("fuxi-alpha", 1), ("fuxi-mme", 2), ("sasrec", 1)])
def test_static_buffer_step_equals_eager_step(model, grad_accum):
    eager, p_eager, _ = run(model, False, grad_accum)
    graph, p_graph, tr = run(model, True, grad_accum)
    assert len(tr.graphed.graphs) >= 2  # more than one bucket of target counts was used
    np.testing.assert_allclose(graph, eager, rtol=1e-5)
    assert p_graph.keys() == p_eager.keys()
    for k in p_eager:  # first step's gradients
        torch.testing.assert_close(p_graph[k], p_eager[k], rtol=1e-4, atol=1e-4 * p_eager[k].abs().max().item() + 1e-9, msg=k)


def test_graphs_are_off_on_cpu_and_when_asked():
    cfg = tiny_config("fuxi-alpha", **{"train.cuda_graphs": "on"})
    ds = load_dataset(cfg.data)
    tr = Trainer(cfg, ds, build_model(cfg.model, ds.num_items, cfg.data.max_len), torch.device("cpu"), None, progress=False)
    assert not graphs_wanted("on", tr.device, False) and tr.graphed is None


def test_bucket_rounded_past_the_batch_size_times_max_len():
    """B*N = 1200 is not a multiple of the 256-position bucket: a full batch rounds up to 1280."""
    eager, g_eager, _ = run("fuxi-alpha", False, **{"train.batch_size": 24, "data.max_len": 50})
    graph, g_graph, tr = run("fuxi-alpha", True, bucket=None, **{"train.batch_size": 24, "data.max_len": 50})
    assert tr.graphed.bucket == 256 and max(Pb for _, Pb in tr.graphed.graphs) > 24 * 50
    np.testing.assert_allclose(graph, eager, rtol=1e-5)


@pytest.mark.parametrize("model", ["fuxi-alpha", "sasrec"])
def test_length_chunks_in_graphs_equal_the_single_pass(model):
    """Rows sorted by length in 4 chunks of 8, each at its width rounded up to a multiple of 10:
    the same losses and gradients as one full-width pass, and as the eager chunked step."""
    single, g_single, _ = run(model, False)
    eager4, g_eager4, _ = run(model, False, **{"train.length_chunks": 4})
    graph4, g_graph4, tr = run(model, True, bucket=None, **{"train.length_chunks": 4})
    g = tr.graphed
    assert (g.chunks, g.R, g.width_step) == (4, 8, 10)
    widths = {w for w, _ in g.graphs}
    assert len(widths) >= 2 and all(w % 10 == 0 and w <= 80 for w in widths)  # narrower than the full width
    for losses in (eager4, graph4):
        np.testing.assert_allclose(losses, single, rtol=1e-5)
    for grads in (g_eager4, g_graph4):
        for k in g_single:
            torch.testing.assert_close(grads[k], g_single[k], rtol=1e-4, atol=1e-5 * g_single[k].abs().max().item() + 1e-9, msg=k)


class RefusesCapture(GraphedStep):
    def _capture(self, key, bufs):
        from fuxi_mme.train.graphs import HostSyncInStep

        raise HostSyncInStep("the training step waits on the GPU")


def test_a_refused_capture_falls_back_to_the_eager_step(caplog):
    eager, p_eager, _ = run("fuxi-mme", False)
    tr = cpu_trainer("fuxi-mme")
    tr.graphed = tr.make_graphed_step(RefusesCapture)
    with caplog.at_level("WARNING"):
        losses, grads = epoch_losses_and_first_grads(tr, 1)
    assert tr.graphed.disabled and not tr.graphed.graphs
    assert "CUDA graphs off for this run (HostSyncInStep" in caplog.text
    np.testing.assert_allclose(losses, eager, rtol=1e-5)


def test_trainer_builds_its_graphed_step(monkeypatch):
    """The Trainer's own construction of the graphed step (not the stand-in's): it reads
    settings the Trainer must have set first, e.g. the length chunks."""
    import fuxi_mme.train.loop as loop

    monkeypatch.setattr(loop, "graphs_wanted", lambda *a: True)
    tr = cpu_trainer("fuxi-alpha", **{"train.length_chunks": 4})
    assert isinstance(tr.graphed, GraphedStep) and tr.graphed.chunks == 4 and tr.graphed.R == tr.cfg.train.batch_size // 4


def test_compile_auto_only_for_the_cuda_graph_step(monkeypatch):
    cfg = tiny_config("fuxi-alpha")
    model = build_model(cfg.model, 50, cfg.data.max_len)
    cm = lambda dev, dist=False: setup.compile_mode(cfg, model, torch.device(dev), dist)  # noqa: E731
    assert cm("cpu") is None  # auto: never on CPU
    assert cm("cuda", True) is None  # nor under DDP
    cfg.train.cuda_graphs = "off"
    assert cm("cuda") is None
    cfg.train.cuda_graphs = "auto"
    have_triton = setup.find_spec("triton") is not None
    assert cm("cuda") == ("graphs" if have_triton else None)
    cfg.train.deterministic = True
    assert cm("cuda") is None  # auto keeps runs reproducible
    cfg.train.compile = True
    assert cm("cpu") == "always"
    cfg.train.compile = False
    assert cm("cuda") is None


def test_compile_auto_leaves_experts_on_u_with_dropout_uncompiled(monkeypatch):
    """Measured on the GPU: that combination trains badly compiled inside CUDA graphs; the
    model says so through its interface (graph_compile_problem)."""
    monkeypatch.setattr(setup, "find_spec", lambda name: object())  # as if triton were there
    cuda = torch.device("cuda")

    def cm(**over):
        cfg = tiny_config("fuxi-mme", **{"model.moe.placement": "u", "model.dropout": 0.2, **over})
        return setup.compile_mode(cfg, build_model(cfg.model, 50, cfg.data.max_len), cuda, False)

    assert cm() is None
    assert cm(**{"model.dropout": 0.0}) == "graphs"
    assert cm(**{"model.moe.placement": "ffn"}) == "graphs"
    assert cm(**{"train.compile": True}) == "always"  # asked for explicitly: done, with a warning


def test_moe_models_compile_without_persistent_reductions(monkeypatch):
    """Models with MoE layers are compiled with Inductor's persistent reductions off (on an
    H200 ptxas never returned on one such kernel of the router statistics); models without
    MoE keep Inductor's defaults, and an explicit TORCHINDUCTOR_PERSISTENT_REDUCTIONS wins."""
    import torch._inductor.config as inductor_config

    from fuxi_mme.models import moe

    monkeypatch.delenv(moe.PERSISTENT_REDUCTIONS_ENV, raising=False)
    mme, alpha = cpu_trainer("fuxi-mme").model, cpu_trainer("fuxi-alpha").model
    assert any(isinstance(m, MoE) for m in mme.modules())
    options = mme.compile_options()
    assert options == {"triton.persistent_reductions": False}
    with inductor_config.patch(options):  # a setting this torch knows (patch raises otherwise)
        assert inductor_config.triton.persistent_reductions is False
    assert alpha.compile_options() is None
    monkeypatch.setenv(moe.PERSISTENT_REDUCTIONS_ENV, "1")
    assert mme.compile_options() is None

    monkeypatch.delenv(moe.PERSISTENT_REDUCTIONS_ENV)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    cpu_trainer("fuxi-mme", **{"train.compile": True})
    cpu_trainer("fuxi-alpha", **{"train.compile": True})
    assert seen == [{"options": {"triton.persistent_reductions": False}}, {"options": None}]


def test_a_failing_compiled_model_is_replaced_by_the_plain_one(caplog):
    """train.compile=auto: if the compiled step fails inside the graph step, the plain step is
    recorded instead; training goes on with the eager step's losses."""
    from fuxi_mme.train.graphs import StepVariant

    def broken(batch, norm):
        raise RuntimeError("inductor could not compile this")

    eager, _, _ = run("fuxi-alpha", False)
    tr = cpu_trainer("fuxi-alpha")
    tr.graphed = tr.make_graphed_step(ReplayEagerly)
    assert [v.name for v in tr.graphed.variants] == ["plain"]  # nothing compiled on the CPU
    tr.graphed.variants.insert(0, StepVariant("compiled", broken, compiled=True))

    # the stand-in capture runs the compiled step once (the real one warms up and captures it),
    # which is where a compiled model fails
    def capture(key, bufs):
        if tr.graphed.variants[0].compiled:
            tr.graphed.variants[0].fn(bufs, tr.graphed.norm)
        ReplayEagerly._capture(tr.graphed, key, bufs)

    tr.graphed._capture = capture
    with caplog.at_level("WARNING"):
        losses, _ = epoch_losses_and_first_grads(tr)
    assert "the compiled step failed in the CUDA-graph step (RuntimeError: inductor could not compile this); recording the plain step" in caplog.text
    assert [v.name for v in tr.graphed.variants] == ["plain"] and not tr.graphed.disabled and tr.graphed.graphs
    np.testing.assert_allclose(losses, eager, rtol=1e-5)


def test_a_compile_still_running_after_the_limit_names_the_workaround(caplog):
    """A first compiled call that runs past the limit logs the known hang's workaround once;
    a quick one, or a call that does not compile, logs nothing."""
    import time

    from fuxi_mme.train.graphs import slow_compile_warning

    with caplog.at_level("WARNING"):
        with slow_compile_warning(True, seconds=0.05):
            deadline = time.monotonic() + 10  # a "compile" that lasts until the warning is out (or 10 s)
            while "torch.compile has been running" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.1)
    assert caplog.text.count("TORCHINDUCTOR_PERSISTENT_REDUCTIONS=0") == 1 and "train.compile=false" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        with slow_compile_warning(True, seconds=0.2):
            pass
        with slow_compile_warning(False, seconds=0.0):
            time.sleep(0.1)
        time.sleep(0.4)  # past the first block's limit: its timer was cancelled
    assert caplog.text == ""


def test_only_the_first_always_compiled_step_is_watched(monkeypatch):
    import contextlib

    from fuxi_mme.train import loop

    seen = []
    monkeypatch.setattr(loop, "slow_compile_warning", lambda active: seen.append(active) or contextlib.nullcontext())
    tr = cpu_trainer("fuxi-alpha")
    tr.compile = "always"  # as train.compile=true resolves (the plain model stands in for the compiled one)
    epoch_losses_and_first_grads(tr)
    assert seen[0] is True and len(seen) > 1 and not any(seen[1:])
    seen.clear()
    tr = cpu_trainer("fuxi-alpha")  # train.compile=auto on the CPU: nothing compiles, nothing watched
    epoch_losses_and_first_grads(tr)
    assert seen and not any(seen)


@pytest.mark.parametrize("model", ["fuxi-alpha", "fuxi-mme", "hstu"])
def test_a_compiled_model_does_not_recompile_on_its_second_call(model):
    """The CUDA-graph step compiles in an unchecked warm-up pass and then runs a second pass
    checked for host syncs; a recompilation there (Inductor synchronises while compiling) made
    every fresh ``fuxi-mme train`` on timestamped data give up the compiled model. The cause was
    a module-level cache of the temporal bucket bounds filled on the first call, which changed
    what the compiled code guards on. Dynamo's guards are the same on every device, so the CPU
    and the ``eager`` backend show it."""
    import torch._dynamo

    from conftest import tiny_config
    from fuxi_mme.models import build_model

    cfg = tiny_config(model)
    torch.manual_seed(0)
    net = build_model(cfg.model, 50, 16)
    ids = torch.randint(1, 50, (4, 16))
    ts = torch.arange(16).repeat(4, 1) * 3600 + 10**9
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager")
    compiled(ids, ts, ts + 60).sum().backward()  # first call: compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(ids, ts, ts + 60).sum().backward()
    torch._dynamo.reset()
