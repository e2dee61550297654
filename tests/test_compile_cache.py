"""The persistent compile cache: what it turns on, and that a warm compile of a graph holding one
of our custom autograd Functions loads its forward/backward graphs instead of tracing them again."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fuxi_mme.config import apply_overrides
from fuxi_mme.presets import build_preset
from fuxi_mme.train.run import compile_shape_key
from fuxi_mme.utils.runtime import JOB_ID_PREFIX, compile_settings, persistent_compile_cache


@pytest.fixture
def no_cache_env(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    yield
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    os.environ.pop("TRITON_CACHE_DIR", None)


def test_cache_folders(tmp_path, no_cache_env):
    folder = persistent_compile_cache(tmp_path)
    assert folder == str(tmp_path / "compile-cache" / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compile-cache" / "triton")


def test_torchs_own_default_is_replaced_and_a_users_folder_stands(tmp_path, no_cache_env, monkeypatch):
    from torch._inductor.runtime.runtime_utils import cache_dir

    cache_dir()  # torch writes its default into the environment (importing torch._dynamo can do this)
    assert persistent_compile_cache(tmp_path) == str(tmp_path / "compile-cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache(tmp_path) == str(tmp_path / "mine")


def test_cache_folders_hold_for_the_run_only(tmp_path, no_cache_env):
    """Two runs in one process with different data folders each cache in their own; after a run
    the variables are as before it."""
    with compile_settings("abc", tmp_path / "a"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "a" / "compile-cache" / "inductor")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "TRITON_CACHE_DIR" not in os.environ
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path / "users-triton")
    with compile_settings("abc", tmp_path / "b"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "b" / "compile-cache" / "inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "users-triton")  # the user's stands
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "users-triton") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_each_run_loads_its_own_shape_profile(monkeypatch):
    """Dynamo loads its automatic-dynamic profile once per process: entering a run's settings
    forgets what an earlier run (another job id) loaded."""
    from torch._dynamo import pgo

    monkeypatch.setattr(pgo, "_CODE_STATE", {"an earlier run's": object()})
    monkeypatch.setattr(pgo, "_INIT_CODE_STATE", {"an earlier run's": object()})
    with torch.compiler.config.patch(job_id=None), compile_settings("abc"):  # whatever TORCH_COMPILE_JOB_ID says
        assert pgo._CODE_STATE is None and pgo._INIT_CODE_STATE is None


def test_settings_hold_for_the_run_only():
    import torch._functorch.config as functorch_config

    assert functorch_config.autograd_cache_allow_custom_autograd_functions is False and torch.compiler.config.job_id is None
    with compile_settings("abc"):
        assert functorch_config.autograd_cache_allow_custom_autograd_functions is True
        assert torch.compiler.config.job_id == JOB_ID_PREFIX + "abc"
    assert functorch_config.autograd_cache_allow_custom_autograd_functions is False and torch.compiler.config.job_id is None


def test_a_users_job_id_stands():
    with torch.compiler.config.patch(job_id="my-job"), compile_settings("abc"):
        assert torch.compiler.config.job_id == "my-job"


def test_shape_key_follows_shapes_not_seeds():
    base = build_preset("demo-fuxi-alpha-base")
    key = compile_shape_key(base)
    assert compile_shape_key(apply_overrides(build_preset("demo-fuxi-alpha-base"), ["train.seed=7", "train.lr=0.01", "train.epochs=3"])) == key
    assert compile_shape_key(apply_overrides(build_preset("demo-fuxi-alpha-base"), ["train.batch_size=64"])) != key
    assert compile_shape_key(apply_overrides(build_preset("demo-fuxi-alpha-base"), ["model.dim=64"])) != key
    assert compile_shape_key(build_preset("demo-fuxi-mme-base")) != key


WARM = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from fuxi_mme.models.attention.shared import lookup
    from fuxi_mme.utils.runtime import compile_settings
    table = torch.nn.Parameter(torch.randn(9))
    idx = torch.randint(0, 9, (4, 32, 32))
    def f(t, i):
        return (lookup(t, i) * 2.0).relu().sum()
    out = []
    for _ in range(2):  # the second compile (after a reset) finds the first one's graphs on disk
        torch._dynamo.reset()
        counters.clear()
        with compile_settings("test", sys.argv[1]):  # as a run: its data folder's compile cache
            torch.compile(f)(table, idx).backward()
        out.append(dict(counters["aot_autograd"]))
    print(json.dumps(out))
    """
)


def test_a_warm_compile_loads_graphs_with_a_custom_autograd_function(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    res = subprocess.run([sys.executable, "-c", WARM, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cold, warm = json.loads(res.stdout.strip().splitlines()[-1])
    assert cold.get("autograd_cache_saved") == 1, cold  # before: "autograd_cache_bypass" (custom Function)
    assert warm.get("autograd_cache_hit") == 1, warm
