"""The program's quick exit (utils/exit_times.quick_exit): the exit code, the output and the
exit handlers survive it; running threads are waited for, as Python does; the interpreter's
teardown does not run; it steps aside for a profiler and for FUXI_MME_QUICK_EXIT=0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, os, sys, threading, time
from fuxi_mme.utils.exit_times import quick_exit

fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)

class Marker:  # freed only by the interpreter's teardown
    def __del__(self):
        os.write(fd, b"teardown ")

KEEP = Marker()
atexit.register(lambda: os.write(fd, b"handler "))
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), os.write(fd, b"thread ")), daemon=False).start()
print("output", end="")
sys.exit(quick_exit(3))
"""


def _run(tmp_path: Path, mode: str, quick: str | None = None) -> tuple[int, str, str]:
    marks = tmp_path / f"marks-{mode}-{quick}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("FUXI_MME_QUICK_EXIT", None)
    if quick is not None:
        env["FUXI_MME_QUICK_EXIT"] = quick
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(marks), mode], capture_output=True, text=True, env=env, timeout=60)
    return p.returncode, p.stdout, marks.read_text() if marks.exists() else ""


def test_quick_exit_keeps_code_output_and_handlers_and_skips_teardown(tmp_path):
    rc, out, marks = _run(tmp_path, "plain")
    assert (rc, out) == (3, "output")
    assert marks == "handler "  # no "teardown": the interpreter's clean-up was skipped


def test_quick_exit_steps_aside_when_asked(tmp_path):
    rc, out, marks = _run(tmp_path, "plain", "0")
    assert (rc, out) == (3, "output")
    assert marks == "handler teardown "  # Python's own exit, teardown included


def test_quick_exit_waits_for_running_threads_as_python_does(tmp_path):
    rc, out, marks = _run(tmp_path, "thread")
    assert (rc, out) == (3, "output")
    assert marks == "thread handler "  # the thread finished first, the handlers ran, no teardown


def test_a_profiler_still_gets_its_output(tmp_path):
    """cProfile writes its file after the program ends: the quick exit steps aside for it."""
    marks, prof = tmp_path / "marks", tmp_path / "out.prof"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("FUXI_MME_QUICK_EXIT", None)
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    p = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(prof), str(script), str(marks), "plain"], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.stdout == "output" and prof.is_file() and prof.stat().st_size > 0  # (cProfile reports exit 0 after a SystemExit)
    assert "teardown " in marks.read_text()


def test_program_entry_uses_it(monkeypatch):
    import fuxi_mme.cli as cli
    from fuxi_mme.utils import bytecode, exit_times

    seen = []
    monkeypatch.setattr(cli, "main", lambda: 7)
    monkeypatch.setattr(exit_times, "quick_exit", lambda code: seen.append(code) or code)
    monkeypatch.setattr(bytecode, "keep", lambda: seen.append("keep"))
    assert cli.entry() == 7 and seen == ["keep", 7]
    src = (Path(cli.__file__).parent / "__main__.py").read_text()
    assert "quick_exit(main())" in src and src.index("keep()") < src.index("from .cli import")
    toml = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'fuxi-mme = "fuxi_mme.cli:entry"' in toml
