"""``--mps``: the Multi-Process Service daemon started for a command's runs and stopped after,
with a stand-in for NVIDIA's control program (the real one needs a GPU machine)."""

import os
import stat

import pytest

from fuxi_mme.utils.mps import CONTROL, MPSError, mps_daemon

FAKE = """#!/usr/bin/env bash
# records each call; "-d" starts a "daemon" (a control file in the pipe folder), "quit" on stdin stops it
log={log}
if [ "${{1:-}}" = "-d" ]; then
  [ -n "${{FAIL:-}}" ] && {{ echo "An instance of this daemon is already running" >&2; exit 1; }}
  echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> "$log"; touch "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0
fi
read -r cmd; echo "$cmd $CUDA_MPS_PIPE_DIRECTORY" >> "$log"
[ -n "${{QUIT_FAILS:-}}" ] && {{ echo "clients still attached" >&2; exit 1; }}
exit 0
"""


@pytest.fixture
def fake_control(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / CONTROL
    log = tmp_path / "calls.log"
    exe.write_text(FAKE.format(log=log))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return log


def test_started_for_the_body_and_stopped_after(tmp_path, fake_control):
    with mps_daemon(True, tmp_path) as pipe:
        assert pipe == os.environ["CUDA_MPS_PIPE_DIRECTORY"] and os.path.isdir(os.environ["CUDA_MPS_LOG_DIRECTORY"])
        assert (tmp_path / os.path.relpath(pipe, tmp_path) / "control").exists()  # the children find the daemon here
    calls = fake_control.read_text().splitlines()
    assert calls[0].startswith(f"start {pipe} ") and calls[1] == f"quit {pipe}"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and "CUDA_MPS_LOG_DIRECTORY" not in os.environ
    assert not os.path.exists(pipe)  # its folders are removed


def test_stopped_when_the_body_fails(tmp_path, fake_control):
    with pytest.raises(KeyboardInterrupt), mps_daemon(True, tmp_path):
        raise KeyboardInterrupt
    assert fake_control.read_text().splitlines()[1].startswith("quit ")


def test_a_running_daemon_is_used_and_left_running(tmp_path, fake_control, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "mine"))
    with mps_daemon(True, tmp_path) as pipe:
        assert pipe == str(tmp_path / "mine")
    assert not fake_control.exists()  # never called: neither started nor stopped


def test_off_does_nothing(tmp_path, fake_control):
    with mps_daemon(False, tmp_path) as pipe:
        assert pipe is None and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert not fake_control.exists()


def test_missing_or_failing_control_program_is_a_one_line_error(tmp_path, fake_control, monkeypatch):
    monkeypatch.setenv("FAIL", "1")
    one_line = r"^--mps: nvidia-cuda-mps-control -d failed \(An instance of this daemon is already running\); run without --mps$"
    with pytest.raises(MPSError, match=one_line):
        with mps_daemon(True, tmp_path):
            pass
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and list(tmp_path.glob("fuxi-mme-mps-*")) == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MPSError, match=r"is not on PATH .*leave out --mps$"):
        with mps_daemon(True, tmp_path):
            pass


def test_a_daemon_that_does_not_stop_is_reported_and_its_pipe_kept(tmp_path, fake_control, monkeypatch, caplog):
    """The body's own error stays the one raised; the warning names the command that stops the
    daemon, and its pipe folder (the only way to reach it) is not deleted."""
    monkeypatch.setenv("QUIT_FAILS", "1")
    with pytest.raises(KeyboardInterrupt), mps_daemon(True, tmp_path) as pipe:
        raise KeyboardInterrupt
    assert os.path.isdir(pipe) and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert f"did not stop (exit 1); stop it with: echo quit | CUDA_MPS_PIPE_DIRECTORY={pipe} nvidia-cuda-mps-control" in caplog.text


def test_a_control_program_that_cannot_run_is_a_one_line_error(tmp_path, fake_control):
    exe = fake_control.parent / "bin" / CONTROL
    exe.write_text("not a program")  # executable, but the kernel cannot run it (Exec format error)
    with pytest.raises(MPSError, match=r"^--mps: nvidia-cuda-mps-control -d could not be run \(OSError: .*\); run without --mps$"):
        with mps_daemon(True, tmp_path):
            pass
    assert list(tmp_path.glob("fuxi-mme-mps-*")) == []
