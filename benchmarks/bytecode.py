"""What kept bytecode saves a command: the imports of a compiled training run (torch, Dynamo,
Inductor and this package's training modules) timed in a fresh interpreter, with every
module compiled from source (no ``.pyc`` readable or writable: a read-only install or
``PYTHONDONTWRITEBYTECODE``, as on the GPU host) against bytecode kept in a cache folder
(what ``fuxi-mme`` does there: ``utils/bytecode.py``, docs/performance.md#time-to-result).

Both cases steer Python with ``PYTHONPYCACHEPREFIX`` (an empty folder that is never written,
or one filled by an earlier run), so the installed ``__pycache__`` folders play no part.

    python benchmarks/bytecode.py            # writes benchmarks/results/bytecode-<card>.json and .md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402

IMPORTS = "import torch, torch._dynamo, torch._inductor.compile_fx, fuxi_mme.train.run, fuxi_mme.models, fuxi_mme.commands"


def _time_imports(imports: str, prefix: str, write: bool) -> tuple[float, int]:
    """Wall seconds of a fresh interpreter doing ``imports``, and the ``.pyc`` files then under ``prefix``."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": prefix, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", imports], env=env, check=True)
    seconds = time.perf_counter() - t0
    return seconds, sum(1 for _ in Path(prefix).rglob("*.pyc"))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--imports", default=IMPORTS, help="the statement timed (default: a compiled training run's imports)")
    ap.add_argument("--out", help="results file (default benchmarks/results/bytecode-<card>.json)")
    args = ap.parse_args(argv)
    from fuxi_mme.utils.runinfo import run_info
    from fuxi_mme.utils.runtime import resolve_device

    info = run_info(resolve_device("auto"))
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as kept:
        compiled = [_time_imports(args.imports, empty, write=False)[0] for _ in range(args.repeats)]
        first, files = _time_imports(args.imports, kept, write=True)  # fills the cache (the first command's cost)
        warm = [_time_imports(args.imports, kept, write=True)[0] for _ in range(args.repeats)]
    row = {
        "compiled_s": compiled,
        "first_s": first,
        "kept_s": warm,
        "pyc_files": files,
        "saved_s": statistics.median(compiled) - statistics.median(warm),
    }
    head = {"info": info, "imports": args.imports, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    md = [
        f"# Bytecode kept or compiled at every command ({card(info)}, {info['device']['cpu_count']} cores, "
        f"commit {(info['commit'] or 'unknown')[:7]})",
        "",
        f"`benchmarks/bytecode.py`: a fresh interpreter doing `{args.imports}`; median of {args.repeats}.",
        "",
        "| bytecode | wall s | .pyc files |",
        "|---|---:|---:|",
        f"| none readable, none written (every module compiled) | {statistics.median(compiled):.2f} | 0 |",
        f"| cache folder, first command (compiled and written) | {first:.2f} | {files:,} |",
        f"| cache folder, later commands (kept) | {statistics.median(warm):.2f} | {files:,} |",
        "",
        f"Saved by kept bytecode: **{row['saved_s']:.2f} s** a command.",
    ]
    out = Path(args.out) if args.out else RESULTS / f"bytecode-{card(info)}.json"
    return save(out, {**head, **row}, md)


if __name__ == "__main__":
    print(main())
