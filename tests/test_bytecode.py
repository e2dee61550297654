"""utils/bytecode.py: torch's bytecode kept in a user folder where the install cannot keep it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from fuxi_mme.utils import bytecode

SRC = Path(__file__).parents[1] / "src"


def _package(tmp_path: Path, with_pyc: bool) -> Path:
    """A fake torch folder holding the probed modules (and their bytecode where asked)."""
    pkg = tmp_path / "torch"
    for rel in bytecode.PROBES:
        src = pkg / rel
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("x = 1\n")
        if with_pyc:
            pyc = Path(importlib.util.cache_from_source(str(src)))
            pyc.parent.mkdir(parents=True, exist_ok=True)
            pyc.write_bytes(b"")
    return pkg


def test_auto_leaves_an_install_that_keeps_or_can_write_its_bytecode(tmp_path):
    cache = tmp_path / "cache"
    kept = _package(tmp_path / "a", with_pyc=True)
    assert bytecode.decide("auto", kept, dont_write=False, prefix_set=False, writable=lambda p: False, default=cache) is None
    assert bytecode.decide("auto", kept, dont_write=True, prefix_set=False, default=cache) is None
    fresh = _package(tmp_path / "b", with_pyc=False)
    assert bytecode.decide("auto", fresh, dont_write=False, prefix_set=False, writable=lambda p: True, default=cache) is None
    assert bytecode.decide("auto", None, dont_write=True, prefix_set=False, default=cache) is None  # no torch found
    assert bytecode.decide("auto", tmp_path / "empty", dont_write=True, prefix_set=False, default=cache) is None  # other layout


def test_auto_uses_the_cache_where_bytecode_is_missing_and_not_kept(tmp_path):
    cache = tmp_path / "cache"
    fresh = _package(tmp_path, with_pyc=False)
    assert bytecode.decide("auto", fresh, dont_write=False, prefix_set=False, writable=lambda p: False, default=cache) == cache
    assert bytecode.decide("", fresh, dont_write=True, prefix_set=False, writable=lambda p: True, default=cache) == cache


def test_explicit_settings_and_a_users_prefix(tmp_path):
    kept = _package(tmp_path / "a", with_pyc=True)
    fresh = _package(tmp_path / "b", with_pyc=False)  # where auto would act
    assert bytecode.decide("off", fresh, dont_write=True, prefix_set=False, writable=lambda p: False) is None
    assert bytecode.decide(str(tmp_path / "mine"), kept, dont_write=False, prefix_set=False) == tmp_path / "mine"
    assert bytecode.decide("auto", fresh, dont_write=True, prefix_set=True, default=tmp_path / "c") is None  # PYTHONPYCACHEPREFIX wins
    assert bytecode.decide(str(tmp_path / "mine"), kept, dont_write=False, prefix_set=True) is None  # PYTHONPYCACHEPREFIX wins
    assert bytecode.default_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fuxi-mme" / "pycache"


def test_keep_sets_the_prefix_for_this_process_and_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    env = {bytecode.ENV: str(tmp_path / "pc")}
    assert bytecode.keep(env) == tmp_path / "pc" and (tmp_path / "pc").is_dir()
    assert sys.pycache_prefix == env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pc") and not sys.dont_write_bytecode
    assert bytecode.keep({bytecode.ENV: str(tmp_path / "other")}) is None  # a prefix in use stands
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # keep() above turned it off
    monkeypatch.setattr(bytecode, "_torch_folder", lambda: _package(tmp_path / "t", with_pyc=False))
    xdg = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), bytecode.ENV: "auto"}  # auto acts (dont_write is on)
    assert bytecode.keep(xdg) == tmp_path / "xdg" / "fuxi-mme" / "pycache" == Path(xdg["PYTHONPYCACHEPREFIX"])
    monkeypatch.setattr(sys, "pycache_prefix", None)
    (tmp_path / "file").write_text("")
    assert bytecode.keep({bytecode.ENV: str(tmp_path / "file" / "pc")}) is None and sys.pycache_prefix is None  # cannot be made


def test_writable_probe(tmp_path):
    assert bytecode._writable(tmp_path) and not list((tmp_path / "__pycache__").iterdir())
    (tmp_path / "file").write_text("")
    assert not bytecode._writable(tmp_path / "file")  # not a folder: no __pycache__ can be made


def test_the_program_writes_bytecode_to_the_cache_before_its_imports(tmp_path):
    """`python -m fuxi_mme` under PYTHONDONTWRITEBYTECODE with FUXI_MME_PYCACHE set: the modules
    imported after the hook (the CLI's) leave their bytecode in the folder, under their path."""
    cache = tmp_path / "pycache"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1", bytecode.ENV: str(cache)}
    env.pop("PYTHONPYCACHEPREFIX", None)
    p = subprocess.run([sys.executable, "-m", "fuxi_mme", "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    written = {f.name.split(".")[0] for f in cache.rglob("*.pyc")}
    assert "cli" in written
    assert any(str(SRC.resolve()).lstrip(os.sep) in str(f) for f in cache.rglob("cli.*.pyc"))
