"""Command line: ``fuxi-mme {train,evaluate,data,experiment,report,recommend,serve,export,presets}``.
Parses and calls one function of ``commands.py``; user errors are printed as one clear line
(exit code 2), never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, commands
from .utils import bytecode, exit_times


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset (see `fuxi-mme presets`); default demo-fuxi-mme-base")
    p.add_argument("--dataset", help="dataset of the preset: demo, ml-1m, amazon-beauty, ... (or use --data-path)")
    p.add_argument("--model", help="model family: fuxi-mme, fuxi-alpha, hstu, sasrec, llama, ssm, popularity")
    p.add_argument("--size", choices=("base", "large"), help="model size of the preset")
    p.add_argument("--config", help="YAML file with sections data:, model:, train:, eval:, log:")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field (repeatable), e.g. --set model.moe.num_experts=8",
    )
    p.add_argument("--data-path", "--source", dest="data_path", help="a user interactions file, or a named dataset's folder, file, archive or URL")
    p.add_argument("--name", help="own data: the name it is known by (default: the file's stem); later commands find it with --dataset NAME")
    p.add_argument(
        "--shape",
        choices=("short", "long", "long-few-users", "long-large", "demo"),
        help="defaults of this data shape instead of the one measured from the data (docs/datasets.md#defaults-by-shape)",
    )
    p.add_argument("--data-dir", help="cache folder for prepared datasets (env FUXI_MME_DATA)")
    p.add_argument("--protocol", choices=("loo-val", "paper"))
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int)
    p.add_argument("--run-dir", help="where the run is written (default runs/<time>-<preset>)")
    g = p.add_argument_group("precision, speed and optimisation (shortcuts for --set train.*)")
    g.add_argument("--batch-size", type=int, help="global batch (split over ranks under torchrun)")
    g.add_argument("--lr", type=float)
    g.add_argument("--amp", choices=("none", "bf16"), help="bf16 autocast with fp32 master weights")
    g.add_argument("--no-tf32", action="store_true", help="disable TF32 matmuls on GPU")
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model on every step (default auto: compiled inside the CUDA graphs on a GPU)"
    )
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    g.add_argument("--schedule", choices=("constant", "cosine"), help="learning-rate schedule (cosine: warmup + cosine decay)")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--grad-accum", type=int, help="optimizer step every N batches")
    g.add_argument("--patience", type=int, help="loo-val early stopping: evaluations without improvement")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (two CPU runs give identical metrics)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files (needs tensorboard)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``train``: the config arguments, resume and progress options."""
    t = sub.add_parser("train", help="train a model and evaluate it (full ranking)")
    _add_config_args(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # every option's default, so `train --resume` can name the options given that it does not apply
    t.set_defaults(func=commands.cmd_train, option_defaults=vars(t.parse_args([])))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    """``evaluate``: a trained run on one split."""
    e = sub.add_parser("evaluate", help="evaluate a trained run (full ranking)")
    e.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder written by fuxi-mme train (its config, data and weights)")
    e.add_argument("--split", default="test", choices=("test", "valid"), help="which held-out targets to rank (default: test)")
    e.add_argument("--checkpoint", default="auto", help="best, last, or auto (best when the run kept one)")
    e.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when one is visible)")
    e.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    e.set_defaults(func=commands.cmd_evaluate)


def _add_data(sub: argparse._SubParsersAction) -> None:
    """``data info`` and ``data prepare``: one dataset, prepared (cached) and described."""
    d = sub.add_parser("data", help="dataset commands")
    dsub = d.add_subparsers(dest="data_command", required=True)
    for name, helptext in (("info", "prepare (cached) and describe a dataset"), ("prepare", "prepare a dataset into the cache")):
        di = dsub.add_parser(name, help=helptext)
        di.add_argument(
            "name",
            nargs="?",
            help="dataset name (demo, ml-100k, ml-1m, ml-1m-ts70, ml-20m, kuairand-pure, kuairand-1k, amazon-beauty, amazon-<category>, file); "
            "with --source: any other name is your own data known by that name (omitted: the file's stem)",
        )
        di.add_argument(
            "--source",
            "--data-path",
            dest="data_path",
            help="folder, file, archive (.zip/.tar.gz) or http(s) URL; omitted: <data-dir>/raw/NAME, else the official download",
        )
        di.add_argument("--data-dir", help="cache folder (env FUXI_MME_DATA)")
        di.add_argument(
            "--ordering",
            default="stable",
            choices=("stable", "hstu"),
            help="stable: ties keep file order (default); hstu: imitate the published HSTU/FuXi code's unstable sort",
        )
        di.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.FIELD=VALUE")
        if name == "prepare":
            di.add_argument("--rebuild", action="store_true", help="prepare the data again and replace the cached copy")
        di.set_defaults(func=commands.cmd_data_info)


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    """``experiment``: suites of runs, aggregated over seeds."""
    x = sub.add_parser(
        "experiment",
        help="run a suite of runs (main, ablation, sweep, capacity, amazon, width, norm, sports, dropout, temperature, scaling, mixer, ...) "
        "and aggregate over seeds",
    )
    x.add_argument(
        "suite",
        nargs="+",
        help="main, ablation, sweep, capacity, amazon, width, norm, sports, dropout, temperature, scaling, precision, loss, mixer, behavior "
        "or robustness; "
        "several run as one queue. Finished runs are skipped; "
        "a finished run made with other settings than the suite now asks for (a changed preset default) is run again, "
        "the old one kept as seed<k>.stale",
    )
    x.add_argument("--root", default="experiments", help="folder for the runs and the aggregated results")
    x.add_argument("--data-root", help="folder with the dataset files (the layout of ../shared/data)")
    x.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, longest first, each on the visible GPU with the fewest running (several small runs share one GPU; "
        "4 to 8 with --mps gave 1.8-2.2x the runs per hour of small runs on one H100: docs/performance.md#many-runs-per-gpu)",
    )
    x.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="the seeds of every variant, run and aggregated (default: the suite's, e.g. main: 5 for FuXi-alpha and Fuxi-MME, 3 for the others)",
    )
    x.add_argument("--datasets", nargs="+", help="the suite's datasets, or others (ml-1m, ml-20m, kuairand-pure, ... from --data-root or downloaded)")
    x.add_argument(
        "--source",
        dest="sources",
        action="append",
        metavar="FILE",
        help="your own interactions file as a dataset of the suites (repeat for several; alone, instead of their datasets; with --datasets, "
        "beside them): named and measured as `train --source FILE` does it, every run with the defaults of its shape (own data "
        "prepared before is also found by its name in --datasets)",
    )
    x.add_argument("--variants", nargs="+", help="a subset of the suite's variants (names as in its tables)")
    x.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="applied to every run")
    x.add_argument(
        "--rerun",
        choices=("all", "without-beyond"),
        help="train finished runs of the selection again (old folder kept as seed<k>.stale): all of them, "
        "or those made before the beyond-accuracy metrics",
    )
    x.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        help="train every missing run, even one that another suite's finished run already trained with the same settings, "
        "data and seed (by default that run's results are reused, and said so)",
    )
    x.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no run after this many seconds; the runs already started finish (the same command continues)",
    )
    x.add_argument(
        "--mps",
        action="store_true",
        help="serve the runs through NVIDIA's Multi-Process Service, started for this command, so the kernels of "
        "several runs share the GPU at once instead of taking turns (docs/performance.md#many-runs-per-gpu)",
    )
    x.add_argument("--aggregate-only", action="store_true", help="only aggregate finished runs under --root")
    x.add_argument(
        "--pack-logs",
        action="store_true",
        help="with --aggregate-only: first move the runs' per-epoch logs into <root>/<suite>/logs.tar.xz "
        "(a run keeps config.json, run.json, metrics.json; running a suite does this by itself)",
    )
    x.add_argument("--docs", help="Markdown page with every suite's tables and plots (default <root>/results.md)")
    x.set_defaults(func=commands.cmd_experiment)


def _add_report(sub: argparse._SubParsersAction) -> None:
    """``report``: curves and a comparison table of runs."""
    r = sub.add_parser("report", help="learning curves (PNG) and a comparison table (Markdown) of runs")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", default="report", help="folder for report.md, curves.png, comparison.png")
    r.set_defaults(func=commands.cmd_report)


def _add_recommend(sub: argparse._SubParsersAction) -> None:
    """``recommend``: top-k for a history, a dataset user or a file of users."""
    rc = sub.add_parser("recommend", help="top-k recommendations for a history, a dataset user or a file of users")
    rc.add_argument("--run", required=True, metavar="RUN_DIR")
    rc.add_argument("--items", nargs="+", metavar="ID", help="history as raw item ids, oldest first")
    rc.add_argument("--timestamps", nargs="+", type=int, metavar="T", help="unix seconds, one per item")
    rc.add_argument(
        "--behaviors", nargs="+", metavar="B", help="one behaviour per item (a model trained with model.use_behavior; docs/serving.md#behaviours)"
    )
    rc.add_argument("--now", type=int, help="time of the next interaction (default: the last timestamp)")
    rc.add_argument("--user", help="use this dataset user's full history")
    rc.add_argument("--input", help="file of users (CSV/TSV/Parquet/JSONL; long user,item[,timestamp] or nested history)")
    rc.add_argument("--output", help="where --input's recommendations go (same formats)")
    rc.add_argument("--user-col", default="user")
    rc.add_argument("--item-col", default="item")
    rc.add_argument("--time-col", default="timestamp")
    rc.add_argument("-k", "--k", type=int, default=10)
    seen = rc.add_mutually_exclusive_group()
    seen.add_argument("--include-seen", dest="exclude_seen", action="store_false", default=None, help="allow items of the history in the results")
    seen.add_argument(
        "--exclude-seen",
        dest="exclude_seen",
        action="store_true",
        help="leave items of the history out of the results "
        "(default: as the run's evaluation, eval.history: excluded unless the data has repeat consumption)",
    )
    rc.add_argument("--unknown-items", default="report", choices=("report", "ignore", "reject"))
    rc.add_argument("--checkpoint", default="auto")
    rc.add_argument("--device")
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(func=commands.cmd_recommend)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """``serve``: the HTTP API of a run or an export."""
    sv = sub.add_parser("serve", help="HTTP JSON API and demo page (needs fuxi-mme[serve])")
    what = sv.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", metavar="RUN_DIR", help="serve a trained run (eager model)")
    what.add_argument("--exported", metavar="DIR", help="serve a `fuxi-mme export` folder on the CPU (no run folder needed)")
    sv.add_argument(
        "--runtime", default="program", choices=("program", "aoti"), help="with --exported: the torch.export program or the AOTInductor package"
    )
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--checkpoint", default="auto")
    sv.add_argument("--device")
    sv.add_argument("--unknown-items", default="report", choices=("report", "ignore", "reject"))
    sv.add_argument("--max-batch", type=int, default=64, help="queries scored together at most")
    sv.add_argument("--max-wait-ms", type=float, default=2.0, help="how long the first request waits for others")
    sv.add_argument("--max-body-kb", type=int, default=1024)
    sv.set_defaults(func=commands.cmd_serve)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``export``: a run as a serving export."""
    ex = sub.add_parser("export", help="torch.export user encoder (+ AOTInductor, ONNX) and item matrix for serving")
    ex.add_argument("run", metavar="RUN", help="the run folder")
    ex.add_argument("out", metavar="OUT", help="a new or empty folder (or an earlier export, replaced)")
    ex.add_argument("--checkpoint", default="auto")
    ex.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package (a C++ compile of about a minute)")
    ex.add_argument("--no-onnx", action="store_true", help="skip the ONNX file (written when fuxi-mme[onnx] is installed)")
    ex.set_defaults(func=commands.cmd_export)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    """``tune``: a hyperparameter search on the validation split."""
    t = sub.add_parser("tune", help="search hyperparameters on the validation split; test once for the winner")
    _add_config_args(t)
    t.add_argument("--space", help="search space YAML (default: the model family's, docs/training.md#tuning)")
    t.add_argument("--trials", type=int, default=20, help="number of trials, the base config's own first (default 20)")
    t.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no trial after this many seconds (the same command continues)")
    t.add_argument("--parallel", type=int, help="trials at once (default: 4 per visible GPU, 1 on CPU)")
    t.add_argument("--mps", action="store_true", help="serve the trials through NVIDIA's Multi-Process Service (as experiment --mps)")
    t.add_argument("--out", help="study folder (default tune/<dataset>-<model>-<size>); an existing one is continued")
    t.add_argument("--sampler", choices=("auto", "optuna", "random"), default="auto", help="auto: Optuna's TPE when installed, else seeded random")
    t.add_argument("--search-seed", type=int, default=0, help="seed of the sampler (the trials train with train.seed)")
    t.add_argument("--no-prune", action="store_true", help="run every trial to its end (default: median pruning)")
    t.add_argument("--no-test", action="store_true", help="do not evaluate the winner on the test split")
    t.add_argument("--keep-checkpoints", action="store_true", help="keep every trial's checkpoints (default: the best trial's best one only)")
    t.set_defaults(func=commands.cmd_tune)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    """``presets``: list presets or show one."""
    pr = sub.add_parser("presets", help="list named presets")
    pr.add_argument("--show", metavar="NAME", help="print one preset's full config")
    pr.set_defaults(func=commands.cmd_presets)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuxi-mme", description="Generative sequential recommendation: Fuxi-MME, FuXi-alpha, HSTU, SASRec.")
    p.add_argument("--version", action="version", version=f"fuxi-mme {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_data, _add_experiment, _add_report, _add_recommend, _add_serve, _add_export, _add_tune, _add_presets):
        add(sub)
    return p


def entry() -> int:
    """The ``fuxi-mme`` program: :func:`main`, then an exit without the interpreter's teardown
    (``utils/exit_times.quick_exit``), with torch's bytecode kept where the install cannot keep
    it (``utils/bytecode.keep``, before torch is imported). Tests call :func:`main`."""
    bytecode.keep()
    return exit_times.quick_exit(main())


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        exit_times.command_ended()
        return rc
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as exc:
        # ConfigError, DataError and CheckpointError derive from these; -v shows the traceback.
        if args.verbose:
            raise
        print(f"fuxi-mme: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = getattr(args, "resume", None) or getattr(args, "run_dir", None)
        where = resume or "RUN_DIR (the run directory logged above)"
        hint = f"; continue with: fuxi-mme train --resume {where}" if args.command == "train" and not args.print_config else ""
        print(f"fuxi-mme: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`fuxi-mme presets | head`): stop quietly. Python flushes stdout
        # again at exit, so point it at devnull first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it


if __name__ == "__main__":
    sys.exit(main())
