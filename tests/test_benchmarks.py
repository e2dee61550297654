"""The one-command benchmark runner picks the right benchmarks for the machine."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import plan  # noqa: E402


def names(cmds):
    return [Path(c[1]).name for c in cmds]


def test_plan_per_machine():
    assert names(plan(0, None)) == ["cpu_epoch.py", "flops.py", "bytecode.py"]
    assert plan(0, "/data")[0][-2:] == ["--data-path", str(Path("/data") / "ml-1m")]
    assert names(plan(1, None)) == ["throughput.py", "attention.py", "profile_step.py", "rank_speed.py", "bytecode.py"]
    from throughput import PATHS

    for cmd in plan(1, None):  # every path run_all asks for exists
        if "--paths" in cmd:
            asked = list(itertools.takewhile(lambda a: not a.startswith("--"), cmd[cmd.index("--paths") + 1 :]))
            assert asked and all(a in PATHS for a in asked), asked
    assert names(plan(2, None))[-1] == "ddp_scaling.py"


def test_dry_run_prints_the_commands():
    import torch

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--dry-run"], capture_output=True, text=True, check=True).stdout
    ran = [Path(line.split()[2]).name for line in out.splitlines() if line.startswith("$ ")]
    assert ran == names(plan(torch.cuda.device_count(), None))


def test_throughput_table_says_what_really_ran():
    from throughput import path_label

    assert path_label({"path": "fast", "cuda_graphs_used": False, "moe_path": "padded"}) == "fast (graphs refused: eager, MoE padded)"
    assert path_label({"path": "fast", "cuda_graphs_used": True, "moe_path": "dense"}) == "fast (MoE dense)"
    assert path_label({"path": "default", "cuda_graphs_used": True, "moe_path": None}) == "default (graphs)"
    assert path_label({"path": "fp32", "cuda_graphs_used": False, "moe_path": None}) == "fp32"
    assert path_label({"path": "chunked-bf16", "cuda_graphs_used": False, "moe_path": None, "length_chunks": 4}) == "chunked-bf16 (4 length chunks)"
    assert (
        path_label({"path": "default-bf16", "cuda_graphs_used": True, "compiled": "graphs", "moe_path": "grouped"})
        == "default-bf16 (graphs, compiled, MoE grouped)"
    )
    assert path_label({"path": "compiled-graph-bf16", "cuda_graphs_used": True, "compiled": None}) == "compiled-graph-bf16 (not compiled)"
    fell = {"path": "compiled-fast", "cuda_graphs_used": True, "compiled": "graphs", "compiled_kept": False, "moe_path": None}
    assert path_label(fell) == "compiled-fast (compile fell back: plain model graphed)"


def test_every_throughput_path_is_a_valid_config():
    from fuxi_mme.config import validate
    from throughput import PATHS, path_config

    for path in PATHS:
        cfg = path_config("ml-20m", "fuxi-mme", path, "cpu")
        validate(cfg)
        assert cfg.train.compile in (True, False, "auto")
    assert path_config("ml-1m", "fuxi-alpha", "compiled-graph-bf16", "cpu").train.compile == "auto"
    assert path_config("ml-1m", "fuxi-alpha", "graph-bf16", "cpu").train.compile is False
    from fuxi_mme.models.attention import fused as fa

    assert path_config("ml-20m", "fuxi-alpha", "compiled-fast-split", "cpu").model.attention == "fused" and fa.BIAS_CHANNELS == "matmul"
    path_config("ml-20m", "fuxi-alpha", "compiled-fast", "cpu")
    assert fa.BIAS_CHANNELS == "kernel"  # every other path resets it


def test_throughput_times_a_whole_epoch_on_cpu(monkeypatch):
    """The --epoch measurement times the library's own epoch loop, every batch of it (tiny data on CPU)."""
    import time

    import torch

    from conftest import tiny_config
    from fuxi_mme.data import load_dataset
    from fuxi_mme.train.loop import Trainer
    from throughput import bench_train

    seen = []
    real = Trainer.train_epoch

    def spy(self, epoch):
        t0, steps = time.perf_counter(), self.state.step
        out = real(self, epoch)
        seen.append((time.perf_counter() - t0, self.state.step - steps, self.steps_per_epoch, len(self.train_arrs)))
        return out

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    cfg = tiny_config("fuxi-alpha")
    ds = load_dataset(cfg.data)
    r = bench_train(cfg, ds, torch.device("cpu"), steps=2, warmup=1, epoch=True)
    ((dt, steps, per_epoch, users),) = seen
    assert steps == per_epoch and r["epoch_s_measured"] >= dt and r["epoch_seq_per_s"] == users / r["epoch_s_measured"]
    assert r["warmup_s"] > 0 and r["compiled"] is None


def test_speed_ups_name_what_they_compare_with():
    from throughput import speedup_cell

    assert speedup_cell({"speedup_vs_reference": 5.111, "speedup_base": "fp32"}) == "5.11x"
    assert speedup_cell({"speedup_vs_reference": 1.5, "speedup_base": "graph-bf16"}) == "1.50x (vs graph-bf16, no fp32 run)"


def test_throughput_table_names_the_tf32_setting_it_ran_with(tmp_path, monkeypatch):
    """The fp32 paths run strict fp32 unless --tf32 on (how `fuxi-mme train` runs them): the
    table's header says which, from the device record."""
    import sys

    from throughput import _parse_args, write

    monkeypatch.setattr(sys, "argv", ["throughput.py"])
    assert _parse_args().tf32 == "off"
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--tf32", "on"])
    assert _parse_args().tf32 == "on"
    info = {"device": {"gpu": "G", "tf32": False}, "versions": {"torch": "t", "cuda": "c"}, "commit": "abc"}
    write([], info, str(tmp_path / "t.json"))
    assert "TF32 off (strict fp32)." in (tmp_path / "t.md").read_text().splitlines()[0]
    write([], {**info, "device": {"gpu": "G", "tf32": True}}, str(tmp_path / "t.json"))
    assert (tmp_path / "t.md").read_text().splitlines()[0].endswith("TF32 on.")


def test_attention_benchmark_times_fuxi_mme_at_its_real_shape():
    """Fuxi-MME's shared decoder calls the FuXi attention once per sequence with its M streams
    as extra heads of width d / M / H: the benchmark must time that shape, not FuXi-alpha's."""
    import torch

    from attention import inputs

    _, _, mme = inputs("ml-20m", "fuxi-mme", 2, torch.float32, torch.device("cpu"))
    _, _, alpha = inputs("ml-20m", "fuxi-alpha", 2, torch.float32, torch.device("cpu"))
    assert (mme["H"], mme["qk_dim"], mme["v_dim"]) == (8, 32, 32)
    assert (alpha["H"], alpha["qk_dim"], alpha["v_dim"]) == (4, 64, 64)


def test_throughput_takes_launch_tables_from_a_sweep_file(tmp_path):
    import json

    import pytest

    from fuxi_mme.models.attention import fused as fa
    from throughput import use_launch_tables

    keep = {k: dict(v) for k, v in fa.LAUNCH.items()}
    try:
        good = tmp_path / "sweep.json"
        good.write_text(json.dumps({"launch_tables": {"fuxi-d32": {"fwd": [16, 32, 2, 1]}}}))
        assert use_launch_tables(str(good)) == {"fuxi-d32": {"fwd": [16, 32, 2, 1]}}
        assert fa.LAUNCH["fuxi-d32"]["fwd"] == (16, 32, 2, 1) and fa.LAUNCH["fuxi-d32"]["bwd_kv"] == keep["fuxi-d32"]["bwd_kv"]
        bad = tmp_path / "other.json"
        bad.write_text(json.dumps({"results": []}))
        with pytest.raises(SystemExit, match="cannot read launch_tables"):
            use_launch_tables(str(bad))
        bad.write_text(json.dumps({"launch_tables": {"nope": {}}}))
        with pytest.raises(SystemExit, match="unknown kernel variant 'nope'"):
            use_launch_tables(str(bad))
    finally:
        for k, v in keep.items():
            fa.LAUNCH[k] = v


def test_fused_attention_picks_the_narrow_head_tables():
    from fuxi_mme.models.attention import fused as fa

    assert fa.launch_kind(False, False, 64) == "fuxi" and fa.launch_kind(False, False, 32) == "fuxi-d32"
    assert fa.launch_kind(False, True, 25) == "fuxi-split-d32" and fa.launch_kind(True, False, 32) == "hstu"
    assert all(fa.launch_kind(h, s, d) in fa.LAUNCH for h in (False, True) for s in (False, True) for d in (16, 64))


def test_eval_speed_times_both_orders_and_checks_their_ranks(tmp_path):
    import json

    out = tmp_path / "eval.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "eval_speed.py"),
            "--preset",
            "demo-fuxi-mme-base",
            "--device",
            "cpu",
            "--set",
            "data.demo_users=300",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (run,) = json.loads(out.read_text())["runs"]
    assert (
        run["users"] == 300
        and run["rows_ranked_differently"] <= 3
        and run["ndcg10_length_sorted"] == pytest.approx(run["ndcg10_user_order"], abs=0.01)
    )
    assert run["length_sorted_s"] > 0 and run["user_order_s"] > 0 and run["device"]["device"] == "cpu"
    assert run["one_pass_s"] > 0 and run["one_pass_rows_ranked_differently"] <= 3 and run["forward_tokens_cpu"] == 4096
    assert "| demo-fuxi-mme-base data.demo_users=300 | valid | 300 |" in out.with_suffix(".md").read_text()


def test_time_to_result_runs_the_cli_cold_then_warm_and_reads_the_phases(tmp_path):
    """The real command twice on the demo: the warm run finds the prepared data (its data phase is
    shorter than preparing it) and every phase the run wrote is in the table."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import time_to_result

    md = time_to_result.main(["--quick", "--device", "cpu", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "ttr.json")])
    res = json.loads((tmp_path / "ttr.json").read_text())
    cold, warm = res["runs"]
    assert (cold["state"], warm["state"]) == ("cold", "warm") and cold["epochs"] == warm["epochs"] == 2
    for r in (cold, warm):
        ph = r["phases"]
        assert {"data", "model", "trainer_setup", "first_epoch", "later_epochs", "evaluations", "write", "total"} <= set(ph)
        assert ph["evaluation_count"] == 3 and 0 < ph["total"] <= r["wall_s"] + 1.0  # 2 validations and the test
        ex = r["exit"]  # the process's own marks split what follows the last phase
        assert all(isinstance(ex[k], float) and ex[k] >= -0.05 for k in ("after_run", "shutdown", "exit_handlers", "teardown")), ex
        assert abs(ph["total"] + sum(ex.values()) - r["wall_s"]) <= 0.5  # every second is in a phase or a part
    assert warm["phases"]["data"] < cold["phases"]["data"]
    assert cold["test_ndcg10"] == warm["test_ndcg10"]  # same seed, same data: the same result
    assert "| demo-fuxi-alpha-base | loo-val | warm |" in md.read_text()


def test_scale_benchmark_generates_the_stated_log_and_measures_every_phase(tmp_path):
    """benchmarks/scale.py at a tiny size: the log has the stated shape, and the real CLI's
    preparation, the training steps and the evaluation of every user each report a time and
    their own peak memory."""
    import json

    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import generate, shape

    info = generate(20_000, tmp_path / "log")
    df = pd.read_parquet(tmp_path / "log")
    s = shape(20_000)
    assert len(df) == 20_000 and df["user"].nunique() == s["users"] and df["item"].max() < s["items"]
    assert df.groupby("user").size().min() >= 3 and info["parts"] >= 1
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sizes", "2e4", "--quick", "--device", "cpu", "--work", str(tmp_path / "w")]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert row["users"] == 400 and row["prepare_s"] > 0 and row["train_step_ms"] > 0 and row["eval_s"] > 0
    assert set(row["step_parts_ms"]) == {"batch", "forward_backward", "optimizer"} and min(row["step_parts_ms"].values()) > 0
    assert res["records"]["2e+04"]["eval"]["eval_users"] == 400  # every user
    assert 0 < info["duplicates"] < 600  # about 1%, dropped by the default --duplicates drop
    assert res["records"]["2e+04"]["prepare"]["stats"]["interactions"] == 20_000 - info["duplicates"]
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    assert not (tmp_path / "w" / "log-2e+04").exists()  # logs and caches removed unless --keep


def test_train_device_applies_the_runs_thread_and_tf32_settings(monkeypatch):
    """utils/runtime.train_device: the one place a run's ``train`` settings become a device."""
    import fuxi_mme.utils.runtime as runtime
    from fuxi_mme.config import TrainConfig

    seen = []
    monkeypatch.setattr(runtime, "setup_device", lambda *a: seen.append(a) or "dev")
    assert runtime.train_device(TrainConfig(device="cpu", num_threads=3, tf32=False), 1) == "dev"
    assert runtime.train_device(TrainConfig(device="cpu")) == "dev"
    assert seen == [("cpu", 1, 3, False), ("cpu", None, None, True)]


def test_scale_workers_set_up_the_device_as_train_does(tmp_path, monkeypatch):
    """scale.py's train and eval workers apply train.tf32 as `fuxi-mme train` does (TF32 on by
    default, strict fp32 with --tf32 off): before this, their GPU rows ran strict fp32, the
    fused ranking included, while the library's runs use TF32."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fuxi_mme.utils.runtime as runtime
    import scale

    class Stop(Exception):
        pass

    seen = []

    def setup(device, local_rank=None, num_threads=None, tf32=True):
        seen.append((device, tf32))
        raise Stop

    monkeypatch.setattr(runtime, "setup_device", setup)
    for flag in ("on", "off"):
        with pytest.raises(Stop):
            scale._trainer(20_000, scale._parse_args(["--work", str(tmp_path), "--device", "cpu", "--tf32", flag]))
    assert seen == [("cpu", True), ("cpu", False)]


def test_runs_per_hour_runs_the_experiment_at_each_setting(tmp_path):
    """benchmarks/runs_per_hour.py --quick: the real experiment command once per --jobs setting,
    in fresh folders, every planned run finished and counted, rates against one at a time."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import runs_per_hour

    md = runs_per_hour.main(["--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "rph.json")])
    res = json.loads((tmp_path / "rph.json").read_text())
    assert [r["jobs"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["runs"] == r["planned"] == 2 and abs(r["runs_per_hour"] - 2 * 3600 / r["wall_s"]) < 0.01 * r["runs_per_hour"]
        assert (tmp_path / "w" / f"jobs-{r['jobs']}" / "main" / "runs.jsonl").exists()
    assert res["rows"][0]["vs_one_at_a_time"] == 1.0 and res["card"] == "cpu"
    assert [r["mps"] for r in res["rows"]] == [False, False]
    assert "| 2 | off | 2 / 2 |" in md.read_text()


def test_runs_per_hour_stops_when_the_command_refuses_its_arguments(tmp_path):
    """An experiment command that fails before any run (an unknown variant) stops the benchmark with
    the command's error, instead of timing every setting's refusal as zero runs an hour."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import runs_per_hour

    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        args = ["--datasets", "demo", "--variants", "nope", "--jobs", "1", "2"]
        runs_per_hour.main([*args, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_flops_counts_the_training_step_of_each_model(tmp_path):
    """benchmarks/flops.py on the ML-1M shape: FuXi-alpha is the unit, Fuxi-MME's dense experts
    count more than each expert on its routed tokens only, and the first defaults' narrow shared
    decoder less than the shipped wider one."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import flops

    md = flops.main(["--shapes", "ml-1m", "--steps", "1", "--batch-size", "16", "--out", str(tmp_path / "f.json")])
    rows = {r["variant"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert set(rows) == {"fuxi-alpha", "fuxi-mme", "fuxi-mme, routed tokens only", "fuxi-mme, first defaults"}
    assert rows["fuxi-alpha"]["vs_fuxi_alpha"] == 1.0 and rows["fuxi-alpha"]["batch_size"] == 16
    assert rows["fuxi-mme"]["moe_path"] == "dense" and rows["fuxi-mme, routed tokens only"]["moe_path"] == "loop"
    assert rows["fuxi-mme"]["mflop_per_sequence"] > rows["fuxi-mme, routed tokens only"]["mflop_per_sequence"]
    assert rows["fuxi-mme, first defaults"]["mflop_per_sequence"] < rows["fuxi-mme"]["mflop_per_sequence"]
    for r in rows.values():
        assert abs(r["gflop_per_step"] * 1e3 / 16 - r["mflop_per_sequence"]) < 1e-6 * r["mflop_per_sequence"]
        assert abs(r["throughput_bound"] * r["vs_fuxi_alpha"] - 1) < 1e-9
    assert "| ml-1m | fuxi-mme | 16 |" in md.read_text()


def test_scale_log_parts_are_the_same_in_worker_processes(tmp_path, monkeypatch):
    """Each part of the synthetic log draws from its own seed: written by two worker processes
    or one after another, the parts are byte for byte the same log."""
    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scale

    monkeypatch.setattr(scale, "PART_ROWS", 4_000)
    one = scale.generate(20_000, tmp_path / "serial", workers=1)
    two = scale.generate(20_000, tmp_path / "parallel", workers=2)
    assert one["parts"] == two["parts"] >= 4 and one["duplicates"] == two["duplicates"] > 0
    for p in sorted((tmp_path / "serial").glob("*.parquet")):
        pd.testing.assert_frame_equal(pd.read_parquet(p), pd.read_parquet(tmp_path / "parallel" / p.name))


def test_bytecode_benchmark_times_compiled_against_kept(tmp_path):
    """benchmarks/bytecode.py on a light import: the cold case leaves no bytecode, the cache
    case fills one, and the results say so."""
    import json

    import bytecode

    out = bytecode.main(["--imports", "import json.decoder, email.mime.text", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["pyc_files"] > 0 and len(got["compiled_s"]) == len(got["kept_s"]) == 1
    assert "every module compiled" in out.read_text()


def test_throughput_and_rank_speed_set_tf32_through_setup_device(monkeypatch):
    """`--tf32 on|off` reaches the device set-up that `fuxi-mme train` uses (its TF32 flags)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fuxi_mme.utils.runtime as runtime
    import rank_speed
    import throughput

    class Stop(Exception):
        pass

    seen = []

    def setup(device, local_rank=None, num_threads=None, tf32=True):
        seen.append(tf32)
        raise Stop

    monkeypatch.setattr(runtime, "setup_device", setup)
    monkeypatch.setattr(throughput, "setup_device", setup)
    for flag in ("on", "off"):
        monkeypatch.setattr(sys, "argv", ["throughput.py", "--device", "cpu", "--tf32", flag])
        with pytest.raises(Stop):
            throughput.main()
        with pytest.raises(Stop):
            rank_speed.main(["--device", "cpu", "--tf32", flag])
    assert seen == [True, True, False, False]
