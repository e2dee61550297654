"""Packing runs onto a GPU by measured memory and host load, and starting again a run that ran out of memory."""

from __future__ import annotations

import json
from pathlib import Path

from fuxi_mme.experiments import packing
from fuxi_mme.experiments.packing import HostLoad, PackingGate, ended_out_of_memory, host_cores, peak_memory_gb


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_a_run_waits_for_free_memory_its_kind_needs():
    clock = Clock()
    free = {"0": 100.0}
    waited_until: list[float] = []

    def sleep(s: float) -> None:
        clock.sleep(s)
        if clock.t >= 30:  # the first run shrinks (or another ends) at t = 30
            free["0"] = 100.0
        waited_until.append(clock.t)

    gate = PackingGate(free=lambda g: free[g], default_gb=8.0, settle_s=10.0, poll_s=1.0, clock=clock, sleep=sleep, idle=lambda: None)
    gate.acquire("0", "a")  # nothing runs there: starts at once
    assert gate.running["0"] == 1 and clock.t == 0
    gate.learn("a", 20.0)  # a run of kind a logged a 20 GiB peak: need 20 * 1.25 + 1.5
    assert gate.expect("a") == 26.5 and gate.expect("b") == 8.0
    free["0"] = 10.0
    gate.acquire("0", "b")  # 10 GiB free covers b's assumed 8, once the first start has settled
    assert clock.t == 10 and gate.running["0"] == 2
    gate.acquire("0", "a")  # a needs 26.5: waits until memory frees up
    assert clock.t == 30 and gate.running["0"] == 3
    gate.release("0")
    gate.release("0")
    gate.release("0")
    assert gate.running["0"] == 0
    gate.raise_need("a")
    assert gate.expect("a") == 26.5 * 1.5
    gate.acquire(None, "a")  # CPU runs are not gated


def test_try_acquire_answers_without_waiting():
    clock = Clock()
    free = {"0": 5.0}
    gate = PackingGate(free=lambda g: free[g], default_gb=8.0, settle_s=10.0, clock=clock, sleep=clock.sleep, idle=lambda: None)
    assert gate.try_acquire("0", "t")  # an empty GPU
    assert not gate.try_acquire("0", "t")  # not settled yet
    clock.t = 11
    assert not gate.try_acquire("0", "t")  # settled, but 5 GiB free < 8 needed
    free["0"] = 50.0
    assert gate.try_acquire("0", "t") and gate.running["0"] == 2
    unknown = PackingGate(free=lambda g: None, clock=clock, sleep=clock.sleep, settle_s=100, idle=lambda: 0.0)
    assert unknown.try_acquire("0", "t") and unknown.try_acquire("0", "t")  # no reading: only --jobs bounds


def test_runs_of_measured_kinds_start_without_waiting_their_needs_held_back_until_they_show():
    """The readings (nvidia-smi's free memory, the idle cores) lag a start by up to the settle
    time. Runs of measured kinds do not wait it out: each recent start's measured needs are taken
    off the readings, so the GPU fills at once but never past what the readings leave. A kind not
    measured yet (its needs a guess) still waits for the last start to settle."""
    clock = Clock()
    reading = {"free": 100.0, "idle": 10.0}
    gate = PackingGate(free=lambda g: reading["free"], settle_s=15.0, poll_s=1.0, clock=clock, sleep=clock.sleep, idle=lambda: reading["idle"])
    gate.acquire("0", "a")  # an empty GPU: at once
    gate.learn("a", 20.0, 2.0)  # measured: 26.5 GiB, 2 cores
    assert gate.try_acquire("0", "a")  # 100 - 26.5 free, 10 - 2 cores idle: at once, no settle
    assert gate.try_acquire("0", "a")  # 100 - 53 >= 26.5
    assert not gate.try_acquire("0", "a")  # 100 - 79.5 < 26.5: held back though the reading shows 100
    assert not gate.try_acquire("0", "b")  # an unmeasured kind waits for the starts to settle
    clock.t = 16  # settled: the readings now show the three runs
    reading["free"] = 40.0
    assert gate.try_acquire("0", "a")  # 40 free covers 26.5
    assert not gate.try_acquire("0", "b")  # that start has not settled
    clock.t = 32
    reading["free"] = 12.0
    assert gate.try_acquire("0", "b")  # settled; 12 covers b's assumed 8
    # the host bound is held back the same way, across GPUs
    host = PackingGate(free=lambda g: 100.0, settle_s=15.0, clock=clock, sleep=clock.sleep, idle=lambda: 5.0)
    host.acquire("0", "c")
    host.acquire("1", "c")
    host.learn("c", 1.0, 2.0)
    clock.t = 100  # both starts settled: 5 idle
    assert host.try_acquire("0", "c")  # 5 idle >= 2
    assert host.try_acquire("1", "c")  # 5 - 2 held for the start on GPU 0 = 3 >= 2
    assert not host.try_acquire("0", "c")  # 5 - 4 = 1 < 2, though the reading shows 5


def test_peaks_and_out_of_memory_ends_are_read_from_the_run(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    records = [{"kind": "train", "gpu_mem_gb": 3.5}, {"kind": "valid", "NDCG@10": 0.1}, {"kind": "train", "gpu_mem_gb": 4.25}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{partial")
    assert peak_memory_gb(run) == 4.25 and peak_memory_gb(tmp_path / "none") is None
    log = tmp_path / "seed0.log"
    log.write_text("INFO ...\nfuxi-mme: error: CUDA out of memory. Tried to allocate 12.00 MiB.\n")
    assert ended_out_of_memory(log)
    log.write_text("fuxi-mme: error: something else\n")
    assert not ended_out_of_memory(log) and not ended_out_of_memory(tmp_path / "missing.log")


def test_a_resumed_suite_starts_with_the_needs_its_finished_gpu_runs_measured(tmp_path, monkeypatch):
    """A suite resumed (a new command, e.g. after --time-budget) learns each kind's needs from its
    finished seeds, loose or packed into runs.jsonl, before starting: the peak in run.json
    (``peak_gpu_gb``, the whole run) and the cores from its CPU seconds. CPU runs teach nothing."""
    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.plan import Job
    from fuxi_mme.experiments.store import RUNS, variant_runs

    suite = tmp_path / "robustness"

    def finished(variant: str, seed: int, device: str, peak: float | None, cpu: float, packed: bool = False) -> None:
        info: dict = {"device": {"device": device}, "host_cpu_seconds": cpu, "phases": {"total": 10.0}}
        if peak is not None:
            info["peak_gpu_gb"] = peak
        files = {"run.json": info, "metrics.json": {"test": {}}, "config.json": {}}
        if packed:
            with (suite / RUNS).open("a") as f:
                f.write(json.dumps({"run": f"ds/{variant}/seed{seed}", **files}) + "\n")
            return
        d = suite / "ds" / variant / f"seed{seed}"
        d.mkdir(parents=True)
        for name, value in files.items():
            (d / name).write_text(json.dumps(value))

    suite.mkdir()
    finished("gpu_kind", 0, "cuda", 10.0, 30.0)  # loose: 10 GiB, 3 cores
    finished("gpu_kind", 1, "cuda", 12.0, 20.0, packed=True)  # packed: 12 GiB, 2 cores
    (suite / "ds" / "gpu_kind" / "seed1.stale").mkdir()  # set aside: not a run of the variant
    finished("cpu_kind", 0, "cpu", None, 20.0)
    assert [d.name for d in variant_runs(suite / "ds" / "gpu_kind")] == ["seed0", "seed1"]
    assert peak_memory_gb(suite / "ds" / "gpu_kind" / "seed1") == 12.0 and host_cores(suite / "ds" / "gpu_kind" / "seed1") == 2.0

    seen = {}

    def fake_run(job, env, stopping=None):
        seen[job.variant] = (gate.expect(("robustness", job.dataset, job.variant)), gate.expect_cores(("robustness", job.dataset, job.variant)))
        return job, 0, 0.0

    monkeypatch.setattr(runner, "run_job", fake_run)
    gate = PackingGate(free=lambda g: None, idle=lambda: None)
    pending = [Job("ds", v, 2, [], suite / "ds" / v / "seed2") for v in ("gpu_kind", "cpu_kind")]
    runner.run_jobs(pending, 1, {id(j): "robustness" for j in pending}, gate=gate)
    assert seen["gpu_kind"] == (12.0 * 1.25 + 1.5, 3.0)  # the larger of each need over its seeds
    assert seen["cpu_kind"] == (8.0, 1.0)  # the defaults: a CPU run's needs say nothing of a GPU run's


def test_a_job_that_ran_out_of_gpu_memory_runs_again(tmp_path, monkeypatch, capsys):
    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.plan import Job

    calls: list[str | None] = []

    def fake_run_job(job, env, stopping=None):
        calls.append(job.gpu)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        log = job.run_dir.parent / f"{job.run_dir.name}.log"
        if len(calls) == 1:
            log.write_text("fuxi-mme: error: CUDA out of memory. Tried to allocate 1.46 GiB.\n")
            return job, 2, 5.0
        (job.run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "gpu_mem_gb": 2.0}) + "\n")
        log.write_text("ok\n")
        return job, 0, 7.0

    monkeypatch.setattr(runner, "run_job", fake_run_job)
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0"])
    gate = PackingGate(free=lambda g: 100.0, settle_s=0, idle=lambda: None)
    job = Job("demo", "sasrec", 0, [], Path(tmp_path / "demo" / "sasrec" / "seed0"))
    failed = runner.run_jobs([job], 1, {id(job): "s"}, gate=gate)
    out = capsys.readouterr().out
    assert failed == {} and calls == ["0", "0"]
    assert "out of GPU memory, started again" in out and "seed 0: ok 12s" in out
    # raised to 8 * 1.5 after the out-of-memory end; the finished run's 2 GiB peak (need 4) stays below it
    assert gate.expect(("s", "demo", "sasrec")) == 12.0
    assert gate.running["0"] == 0


def test_free_memory_is_none_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(packing.shutil, "which", lambda name: None)
    assert packing.free_memory_gb("0") is None


def test_a_run_waits_for_the_idle_host_cores_its_kind_keeps_busy():
    """Memory fits throughout; the host is the bound: a kind measured at 3 cores waits until 3
    cores are idle, an unknown kind needs one."""
    clock = Clock()
    idle = {"cores": 0.5}

    def sleep(s: float) -> None:
        clock.sleep(s)
        if clock.t >= 40:  # a run's compile workers finish at t = 40
            idle["cores"] = 6.0

    gate = PackingGate(free=lambda g: 100.0, settle_s=10.0, poll_s=1.0, clock=clock, sleep=sleep, idle=lambda: idle["cores"])
    gate.acquire("0", "a")  # an idle GPU: starts whatever the host does
    gate.learn("a", None, 3.0)
    assert gate.expect_cores("a") == 3.0 and gate.expect_cores("b") == 1.0
    gate.acquire("0", "a")  # half a core idle: waits for 3
    assert clock.t == 40 and gate.running["0"] == 2
    gate.learn("a", None, 2.0)  # a lighter run of the same kind does not lower its need
    assert gate.expect_cores("a") == 3.0
    idle["cores"] = 1.5
    clock.t += 10
    assert not gate.try_acquire("0", "a") and gate.try_acquire("0", "b")  # 1.5 idle: b's 1 fits, a's 3 does not
    gate.learn("c", 4.0)
    assert gate.expect_cores("c") == 1.0  # a memory peak alone teaches no cores


def test_a_start_on_one_gpu_holds_the_host_bound_on_every_gpu():
    """Two GPUs each running a run, the host with 3 idle cores, a kind needing 2: once one joins
    GPU 0, a second joins GPU 1 only after the settle time, when the reading includes the first."""
    clock = Clock()
    idle = {"cores": 3.0}
    gate = PackingGate(free=lambda g: 100.0, settle_s=10.0, poll_s=1.0, clock=clock, sleep=clock.sleep, idle=lambda: idle["cores"])
    gate.acquire("0", "a")
    gate.acquire("1", "a")  # an idle GPU: starts at once
    gate.learn("a", None, 2.0)
    clock.t = 20
    assert gate.try_acquire("0", "a")
    # the reading still mostly covers the time before that start (3 idle): GPU 1 has started
    # nothing lately, but the start on GPU 0 has not settled, so it waits
    assert not gate.try_acquire("1", "a")
    idle["cores"] = 1.0  # what the reading shows once that start is under way
    clock.t = 31
    assert not gate.try_acquire("1", "a")  # settled, and 1 idle core < 2
    idle["cores"] = 2.5
    assert gate.try_acquire("1", "a")


def test_host_load_reads_the_idle_share_of_this_process_cores(tmp_path):
    """Two /proc/stat readings a window apart: the idle and iowait ticks over all ticks of the
    cores this process may use, times their count; other cores and the summary line ignored."""
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    first = "cpu  999 0 0 999 0 0 0 0\ncpu0 100 0 0 100 0 0 0 0\ncpu1 100 0 0 100 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\nintr 1 2\n"
    # cpu0 fully busy, cpu1 idle 75% (60 idle + 15 iowait of 100), cpu2 (not ours) fully idle
    second = "cpu  999 0 0 999 0 0 0 0\ncpu0 200 0 0 100 0 0 0 0\ncpu1 120 0 5 160 15 0 0 0\ncpu2 0 0 0 100 0 0 0 0\n"
    clock = Clock()
    stat.write_text(first)

    def sleep(s: float) -> None:
        clock.sleep(s)
        stat.write_text(second)

    host = HostLoad(stat=stat, cores={0, 1}, window_s=1.0, max_age_s=10.0, clock=clock, sleep=sleep)
    assert host.idle_cores() == 2 * 75 / 200 and clock.t == 1.0  # no earlier reading: one taken a window before
    stat.write_text(second.replace("cpu0 200 0 0 100", "cpu0 200 0 0 300").replace("cpu1 120", "cpu1 320"))
    clock.t += 5  # a reading 5 s old: used as the start of the window, no sleep
    assert host.idle_cores() == 2 * 200 / 400 and clock.t == 6.0
    assert HostLoad(stat=tmp_path / "missing").idle_cores() is None


def test_host_cores_are_cpu_seconds_over_wall_seconds(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    assert host_cores(run) is None
    (run / "run.json").write_text(json.dumps({"phases": {"total": 40.0}, "host_cpu_seconds": 60.0}))
    assert host_cores(run) == 1.5
    (run / "run.json").write_text(json.dumps({"phases": {"total": 40.0}}))  # a run from before the field
    assert host_cores(run) is None


def test_a_runs_cpu_seconds_include_its_live_workers():
    """Inductor's compile workers live until the run's process exits, after run.json is written:
    their CPU counts all the same (read from /proc)."""
    import subprocess
    import sys

    from fuxi_mme.utils.runinfo import live_descendants_cpu_seconds, process_cpu_seconds

    if not Path("/proc/self/stat").exists():
        import pytest

        pytest.skip("no /proc")
    before = process_cpu_seconds()
    burn = "import sys, time\nwhile time.process_time() < 0.4: pass\nprint('ready', flush=True)\nsys.stdin.read()"
    worker = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"  # alive, 0.4 CPU seconds spent
        assert live_descendants_cpu_seconds() >= 0.35
        assert process_cpu_seconds() - before >= 0.35
    finally:
        worker.communicate("")


def test_an_unmeasured_variant_takes_the_needs_of_its_family():
    """Runs of one model on one dataset that differ only in data-side settings (noise, sparsity)
    are one family: once any of them is measured, the others start as measured kinds (no wait for
    the last start to settle) with the family's needs; their own measurements then take over."""
    clock = Clock()
    gate = PackingGate(free=lambda g: 100.0, settle_s=15.0, clock=clock, sleep=clock.sleep, idle=lambda: 10.0)
    gate.relate("noisy", "model-a")
    gate.relate("clean", "model-a")
    gate.acquire("0", "clean")
    assert not gate.try_acquire("0", "noisy")  # nothing of the family measured: waits to settle
    gate.learn("clean", 20.0, 2.0)
    assert gate.expect("noisy") == 26.5 and gate.expect_cores("noisy") == 2.0 and gate.measured("noisy")
    assert gate.try_acquire("0", "noisy") and gate.try_acquire("0", "noisy")  # at once: 100 - 26.5 * 2 >= 26.5 (the family's need)
    assert not gate.try_acquire("0", "noisy")  # 100 - 26.5 * 3 < 26.5
    assert gate.expect("other") == 8.0 and not gate.measured("other")  # no family: the defaults
    gate.learn("noisy", 30.0)
    assert gate.expect("noisy") == 39.0 and gate.expect("clean") == 26.5  # its own measurement; the family's need is the larger
    gate.relate("sparse", "model-a")
    assert gate.expect("sparse") == 39.0


def test_the_robustness_suites_families_are_its_models_and_batch_widths(tmp_path):
    """On the real plan: a model's noise rows are one family, each sparsity protocol its own (a
    last-20 run's rows are 21 wide, not 200), each denoising design its own model."""
    from fuxi_mme.experiments import SUITES, plan
    from fuxi_mme.experiments.plan import job_family

    jobs = plan(SUITES["robustness"], tmp_path, None, [], ["ml-1m-ts70"], [0], check_data=False)
    fam = {j.variant: job_family(j) for j in jobs}
    assert fam["fuxi-mme, clean"] == fam["fuxi-mme, insert 10%"] == fam["fuxi-mme, insert 40%"]
    assert len({fam["fuxi-mme, clean"], fam["fuxi-mme, last 20 events"], fam["fuxi-mme, drop 50%"]}) == 3
    assert fam["fuxi-mme gate, clean"] != fam["fuxi-mme, clean"] != fam["fuxi-alpha, clean"]
    assert len(set(fam.values())) == 6 * 3  # six models, each: noise rows, last 20, drop 50%


def test_an_out_of_memory_end_raises_the_family_and_failed_runs_teach_nothing(tmp_path, monkeypatch):
    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.plan import Job

    gate = PackingGate(free=lambda g: 100.0, settle_s=0, idle=lambda: None)
    gate.relate("a", "fam")
    gate.relate("b", "fam")
    gate.learn("a", 4.0)
    gate.raise_need("a")
    assert gate.expect("b") == gate.expect("a") == (4.0 * 1.25 + 1.5) * 1.5  # a sibling does not start on the old need

    def crashed(job, env, stopping=None):
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "gpu_mem_gb": 0.1}) + "\n")
        (job.run_dir.parent / f"{job.run_dir.name}.log").write_text("fuxi-mme: error: bad setting\n")
        return job, 2, 1.0

    monkeypatch.setattr(runner, "run_job", crashed)
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0"])
    fresh = PackingGate(free=lambda g: 100.0, settle_s=0, idle=lambda: None)
    job = Job("ds", "v", 0, [], tmp_path / "ds" / "v" / "seed0")
    runner.run_jobs([job], 1, {id(job): "s"}, gate=fresh)
    assert not fresh.measured(("s", "ds", "v"))  # its 0.1 GiB says nothing of the kind's need


def test_job_family_puts_data_side_variants_of_one_model_together(tmp_path):
    from fuxi_mme.experiments.plan import Job, job_family

    def job(variant: str, model: dict, noise: float, dataset: str = "ds") -> Job:
        planned = {"model": model, "data": {"max_len": 50, "noise": {"rate": noise}}, "train": {"batch_size": 128, "loss": "full", "seed": 0}}
        return Job(dataset, variant, 0, [], tmp_path / variant, planned=planned)

    a = {"name": "fuxi-mme", "dim": 64, "denoise": "none"}
    assert job_family(job("clean", a, 0.0)) == job_family(job("insert 10%", a, 0.1))
    assert job_family(job("gate", {**a, "denoise": "gate"}, 0.0)) != job_family(job("clean", a, 0.0))  # another model
    assert job_family(job("clean", a, 0.0, dataset="other")) != job_family(job("clean", a, 0.0))
    assert job_family(Job("ds", "v", 0, [], tmp_path / "v")) == ("ds", "v")  # no planned config: its own variant


def test_a_suite_relates_each_variant_to_its_family(tmp_path, monkeypatch):
    """run_jobs relates each pending job to its family: a noise variant whose model was measured
    on the same data earlier in the command starts with that measurement, not the defaults."""
    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.plan import Job

    seen: dict[str, tuple[bool, float]] = {}

    def fake_run_job(job, env, stopping=None):
        seen[job.variant] = (gate.measured(("s", job.dataset, job.variant)), gate.expect(("s", job.dataset, job.variant)))
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "gpu_mem_gb": 4.0}) + "\n")
        return job, 0, 1.0

    monkeypatch.setattr(runner, "run_job", fake_run_job)
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(runner, "job_cost", lambda job: {"clean": 2.0, "insert 10%": 1.0}[job.variant])  # clean first
    gate = PackingGate(free=lambda g: 100.0, settle_s=0, idle=lambda: None)
    planned = {"model": {"name": "sasrec"}, "data": {"max_len": 50}, "train": {"batch_size": 128}}
    jobs = [Job("ds", v, 0, [], tmp_path / "ds" / v / "seed0", planned=planned) for v in ("clean", "insert 10%")]
    assert runner.run_jobs(jobs, 1, {id(j): "s" for j in jobs}, gate=gate) == {}
    assert seen == {"clean": (False, 8.0), "insert 10%": (True, 4.0 * 1.25 + 1.5)}
