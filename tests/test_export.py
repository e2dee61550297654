"""Export (``fuxi-mme export``, ``load_exported``, ``serve --exported``): the exported program
gives the eager model's top-k for histories of several lengths and batch sizes (dynamic shapes),
checksums refuse a changed file, serving needs neither the run folder nor the training code,
and the optional ONNX and AOTInductor artefacts agree with the program."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from fuxi_mme.cli import main
from fuxi_mme.serve import Query, Recommender
from fuxi_mme.serve.export import export_run, load_exported
from fuxi_mme.train.run import train

# (model, overrides): Fuxi-MME with MoE on the batched back end, which does not export as is
# (the exporter captures the dense one: same weights, same results)
MODELS = {"fuxi-alpha": {}, "fuxi-mme": {"model.moe.backend": "batched"}}


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    os.environ["FUXI_MME_DATA"] = str(root / "cache")
    train(tiny_config(request.param, **{"train.epochs": 1, "log.run_dir": str(root / "run"), **MODELS[request.param]}))
    rec = Recommender.from_run(root / "run", device="cpu")
    res = export_run(rec, root / "exp", aoti=False, onnx=False)
    return rec, root / "run", root / "exp", res


def _queries(rec, spec):
    """One query per (user, history length); None = the user's full history."""
    out = []
    for u, n in spec:
        q = rec.history_of(rec.ds.user_raw[u])
        if n is not None:
            q.history, q.timestamps = q.history[:n], q.timestamps[:n]
        q.k = 10
        out.append(q)
    return out


# batch sizes 1, 2, 5 and padded lengths from 1 to max_len (a full history is truncated to it)
BATCHES = [[(0, 1)], [(1, 3), (2, 7)], [(3, 2), (4, 12), (6, 1), (7, 16), (9, 5)], [(5, None), (8, None)]]


def test_exported_top_k_equals_eager(trained):
    rec, _, exp, res = trained
    assert {"user_encoder.pt2", "items.safetensors", "items.json", "export.json", "checksums.json"} <= set(res["files"])
    served = load_exported(exp)
    assert served.max_len == rec.max_len and torch.equal(served.items_ID, rec.items_ID)
    lengths = set()
    for spec in BATCHES:
        qs = _queries(rec, spec)
        lengths.add(rec.batch_tensors([rec.prepare(q) for q in qs]).ids.shape[1])
        want, got = rec.recommend(qs), served.recommend(qs)
        for w, g in zip(want, got):
            assert [x["item"] for x in g["items"]] == [x["item"] for x in w["items"]]
            assert [x["score"] for x in g["items"]] == pytest.approx([x["score"] for x in w["items"]], abs=1e-5)
            assert g.get("truncated") == w.get("truncated")
    assert any(r.get("truncated") for r in got)  # the last batch's histories are longer than max_len
    assert lengths == {1, 7, 16, rec.max_len}  # the program ran at several lengths


def test_manifest_describes_the_export(trained):
    rec, _, exp, _ = trained
    meta = json.loads((exp / "export.json").read_text())
    assert meta["model"] == rec.cfg.model.name and meta["dataset"] == rec.ds.name
    assert meta["max_len"] == rec.max_len and meta["items"] == rec.num_items and meta["dim"] == rec.items_ID.shape[1]
    assert meta["files"]["aoti"] is None and meta["files"]["onnx"] is None
    ids = json.loads((exp / "items.json").read_text())
    assert ids["raw_ids"][1:] == [v.item() for v in rec.item_raw[1:]] and ids["titles"] == rec.titles
    ep = torch.export.load(str(exp / "user_encoder.pt2"))
    user = ep.module()(*(torch.ones(4, 6, dtype=torch.int64),) * 3)
    assert user.shape == (4, meta["dim"]) and user.dtype == torch.float32


def test_checksums_refuse_a_changed_file(trained, tmp_path):
    import shutil

    from fuxi_mme.utils.integrity import IntegrityError

    _, _, exp, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(exp, bad)
    data = bytearray((bad / "items.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "items.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="items.safetensors does not match its recorded sha256"):
        load_exported(bad)
    (bad / "checksums.json").unlink()
    with pytest.raises(IntegrityError, match="no checksums.json"):
        load_exported(bad)
    with pytest.raises(FileNotFoundError, match=r"is not an export \(no export.json\); create one with `fuxi-mme export"):
        load_exported(tmp_path)


def test_serving_an_export_needs_no_run_folder_and_no_training_code(trained, tmp_path):
    rec, _, exp, _ = trained
    q = _queries(rec, [(2, 6)])[0]
    code = (
        "import json, sys\n"
        "from fuxi_mme.serve.export import load_exported\n"
        "from fuxi_mme.serve import Query\n"
        f"r = load_exported({str(exp)!r}).recommend([Query({q.history!r}, {q.timestamps!r}, k=5)])[0]\n"
        "print(json.dumps([[x['item'] for x in r['items']], sorted(m for m in sys.modules if m.startswith('fuxi_mme.'))]))\n"
    )
    env = {**os.environ, "FUXI_MME_DATA": str(tmp_path / "empty-cache")}  # no dataset either
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    items, modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert items == [x["item"] for x in rec.recommend([Query(q.history, q.timestamps, k=5)])[0]["items"]]
    assert not [m for m in modules if m.startswith("fuxi_mme.train")]


def test_cli_export_and_the_http_service_on_the_export(trained, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from fuxi_mme.serve.app import create_app

    rec, run, _, _ = trained
    out = tmp_path / "exp"
    assert main(["export", str(run), str(out), "--no-aoti", "--no-onnx"]) == 0
    assert "user_encoder.pt2" in capsys.readouterr().out
    assert main(["export", str(run), str(out), "--no-aoti", "--no-onnx"]) == 0  # an earlier export is replaced
    q = _queries(rec, [(4, 9)])[0]
    with TestClient(create_app(load_exported(out))) as c:
        r = c.post("/recommend", json={"history": q.history, "timestamps": q.timestamps, "k": 7})
        assert r.status_code == 200
        assert [x["item"] for x in r.json()["items"]] == [x["item"] for x in rec.recommend([Query(q.history, q.timestamps, k=7)])[0]["items"]]
        assert c.post("/recommend", json={"history": [], "k": 3}).status_code == 422
        assert c.get("/model").json()["model"] == rec.cfg.model.name
    # an export stopped half-way (Ctrl-C after the program was saved) is replaced too
    half = tmp_path / "half"
    half.mkdir()
    (half / "user_encoder.pt2").write_bytes(b"partial")
    (half / ".tmp-user_encoder.pt2").write_bytes(b"partial")
    assert main(["export", str(run), str(half), "--no-aoti", "--no-onnx"]) == 0
    assert not (half / ".tmp-user_encoder.pt2").exists() and (half / "export.json").is_file()
    # user errors: one line, exit code 2
    assert main(["export", str(run), str(run), "--no-aoti"]) == 2
    assert "is not empty and holds no earlier export" in capsys.readouterr().err
    assert main(["serve", "--exported", str(tmp_path / "nothing")]) == 2
    assert "is not an export" in capsys.readouterr().err
    assert main(["serve", "--exported", str(out), "--device", "cuda"]) == 2
    assert "serves on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--run", str(run), "--exported", str(out)])  # one or the other


def test_onnx_export_agrees_with_the_program(trained, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    rec, _, _, _ = trained
    if rec.cfg.model.name != "fuxi-mme":
        pytest.skip("one model is enough (about 10 s each)")
    res = export_run(rec, tmp_path / "exp", aoti=False, onnx=True)
    assert "user_encoder.onnx" in res["files"]
    ep = torch.export.load(str(tmp_path / "exp" / "user_encoder.pt2")).module()
    sess = ort.InferenceSession(str(tmp_path / "exp" / "user_encoder.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    for B, N in [(1, 1), (3, 8), (6, rec.max_len)]:
        ids = torch.randint(1, rec.num_items + 1, (B, N), generator=g)
        ts = torch.cumsum(torch.randint(0, 1000, (B, N), generator=g), 1)
        got = sess.run(None, {"ids": ids.numpy(), "ts": ts.numpy(), "query_ts": ts.numpy()})[0]
        assert torch.allclose(torch.from_numpy(got), ep(ids, ts, ts), atol=1e-5)
    load_exported(tmp_path / "exp")  # the ONNX file is under the checksums too


@pytest.mark.slow
def test_aoti_package_serves_the_same_top_k(trained, tmp_path):
    """About a minute of C++ compilation: the AOTInductor package's top-k equals the eager one."""
    rec, _, _, _ = trained
    if rec.cfg.model.name != "fuxi-mme":
        pytest.skip("one model is enough")
    res = export_run(rec, tmp_path / "exp", aoti=True, onnx=False)
    if "user_encoder.aoti.pt2" not in res["files"]:
        pytest.skip("AOTInductor could not build here (no C++ compiler?)")
    served = load_exported(tmp_path / "exp", runtime="aoti")
    for spec in BATCHES:
        qs = _queries(rec, spec)
        assert [[x["item"] for x in r["items"]] for r in served.recommend(qs)] == [[x["item"] for x in r["items"]] for r in rec.recommend(qs)]


def test_the_package_holds_no_torchscript():
    """TorchScript is deprecated by PyTorch: export, serving and the models use torch.export."""
    from pathlib import Path

    import fuxi_mme

    src = Path(fuxi_mme.__file__).parent
    assert not [str(p.relative_to(src)) for p in src.rglob("*.py") if "torch.jit" in p.read_text()]
