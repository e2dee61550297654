"""What each ``fuxi-mme`` subcommand does (``cli.py`` parses the command line and calls one of
these): build the config, call the library, print the result."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def metrics_table(rows: dict[str, dict[str, Any]], title: str = "") -> str:
    """Plain-text table: one row per split/model, metric columns in a stable order."""
    cols: list[str] = []
    for m in rows.values():
        cols.extend(k for k in m if k not in cols and isinstance(m[k], (int, float)))
    first = max([len("split")] + [len(r) for r in rows])
    widths = [max(len(c), 7) for c in cols]
    lines = [title] if title else []
    lines.append("  ".join(["split".ljust(first)] + [c.rjust(w) for c, w in zip(cols, widths)]))
    for name, m in rows.items():
        lines.append("  ".join([name.ljust(first)] + [_fmt(m.get(c, "")).rjust(w) for c, w in zip(cols, widths)]))
    from .eval.beyond import beyond_block  # the compact second block: coverage, Gini, novelty, ILD, ...

    return "\n".join(lines) + beyond_block(rows)


def split_rows(name: str, m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A split's table row, and beside it its repeat-target and new-item-target rows when the
    split has repeat targets (docs/training.md#history-masking), and one row per history-length
    bucket with its user count (docs/training.md#history-length-buckets)."""
    from .eval.buckets import BUCKET_EDGES

    rows = {name: m}
    split = name.split()[0]  # rows are keyed by split: valid's must not be test's
    for key, label in (("repeat_targets", "repeat targets"), ("new_targets", "new-item targets")):
        if isinstance(m.get(key), dict):
            rows[f"  {split}: {label}"] = m[key]
    lo, hi = BUCKET_EDGES
    ranges = {"short": f"< {lo}", "medium": f"{lo}-{hi - 1}", "long": f">= {hi}"}
    for bucket, b in (m.get("buckets") or {}).items():
        if isinstance(b, dict):
            label = f"  {split}: {bucket} history ({ranges.get(bucket, '?')}), {b.get('users', 0):,} users"
            rows[label] = {k: v for k, v in b.items() if k != "users"}
    return rows


def build_config(args: argparse.Namespace):
    """The run's config: a named preset, or for own data (``--source FILE`` without a named
    dataset) the defaults of the shape measured from the data (docs/datasets.md#defaults-by-shape)."""
    from .config import ConfigError, validate
    from .data import is_own_data, own_data_name
    from .presets import MODEL_FAMILIES, build_defaults, build_preset, parse_preset, preset_name
    from .shapes import DATASETS

    if args.preset:
        dataset, model, size = parse_preset(args.preset)
    else:
        dataset, model, size = "demo", "fuxi-mme", "base"
    if args.data_path and not args.dataset and not args.preset:
        dataset = getattr(args, "name", None) or own_data_name(args.data_path)
    dataset = args.dataset or dataset
    model = args.model or model
    size = args.size or size
    if args.model and args.model not in MODEL_FAMILIES:
        raise ConfigError(f"unknown model {args.model!r} (--model); model families: {', '.join(MODEL_FAMILIES)}")
    shape = getattr(args, "shape", None)
    measured = not args.preset and not shape and (dataset not in DATASETS or is_own_data(dataset))
    if args.preset or (dataset in DATASETS and not measured and not shape):
        cfg = build_preset(preset_name(dataset, model, size))
    else:  # --shape, or own data / a dataset without presets: "long" until measured
        cfg = build_defaults(shape or "long", model, size, dataset)
    _apply_args(cfg, args)
    if measured:
        cfg = build_defaults(_measured_shape(cfg), model, size, cfg.data.name)
        _apply_args(cfg, args)
    _absolute_source(cfg)
    validate(cfg)
    return cfg


def _absolute_source(cfg) -> None:
    """A relative local ``data.path`` as an absolute one, so the run's config finds its data
    from any folder (``evaluate --run``, ``recommend --run`` elsewhere)."""
    from .data.download import is_url

    path = cfg.data.path
    if path and not is_url(path) and not Path(path).expanduser().is_absolute():
        cfg.data.path = str(Path(path).expanduser().resolve())


def _apply_args(cfg, args: argparse.Namespace) -> None:
    """The command line's settings on top of the defaults (the YAML of --config first)."""
    from .config import apply_mapping, apply_overrides, load_yaml

    if args.config:
        apply_mapping(cfg, load_yaml(args.config))
    direct = {
        "data.path": args.data_path,
        "data.data_dir": args.data_dir,
        "data.protocol": args.protocol,
        "train.epochs": args.epochs,
        "train.device": args.device,
        "train.seed": args.seed,
        "log.run_dir": args.run_dir,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.amp": args.amp,
        "train.tf32": False if args.no_tf32 else None,
        "train.compile": True if args.compile else None,
        "train.grad_clip": args.grad_clip,
        "train.schedule": args.schedule,
        "train.warmup_steps": args.warmup_steps,
        "train.grad_accum": args.grad_accum,
        "train.patience": args.patience,
        "train.deterministic": True if args.deterministic else None,
        "log.tensorboard": True if args.tensorboard else None,
    }
    apply_overrides(cfg, [f"{k}={v}" for k, v in direct.items() if v is not None])
    apply_overrides(cfg, args.overrides)


def _measured_shape(cfg) -> str:
    """Prepare (or load) own data and pick its shape from what it looks like; logged."""
    from .config import validate
    from .data import measured_shape

    validate(cfg)  # data.sep and friends spelled as the readers take them
    shape, why = measured_shape(cfg.data)
    logging.getLogger("fuxi_mme").info("%s: shape %s: %s (--shape NAME to choose another)", cfg.data.name, shape, why)
    return shape


def cmd_train(args: argparse.Namespace) -> int:
    from .runs import load_run
    from .train.run import train

    if args.resume:
        cfg = load_run(args.resume)
        if args.epochs:
            cfg.train.epochs = args.epochs
        if args.device:  # e.g. a GPU run continued on a CPU: the checkpoint loads onto it
            cfg.train.device = args.device
        ignored = _resume_ignores(args)
        if ignored:
            logging.getLogger("fuxi_mme").warning(
                "--resume continues the run with its own settings: %s ignored (only --epochs, --device and --no-progress apply)",
                ", ".join(ignored),
            )
    else:
        cfg = build_config(args)
    if args.no_progress:
        cfg.log.progress = False
    if args.print_config:
        print(cfg.to_json())
        return 0
    res = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 prints
    rows = {}
    if "valid_best" in res:
        rows.update(split_rows(f"valid (epoch {res.get('selected_epoch', '-')})", res["valid_best"]))
    if res.get("test") is not None:  # eval.final_test=false (tune's trials): validation only
        rows.update(split_rows("test", res["test"]))
    title = f"{res['model']} on {res['dataset']}, protocol {res['protocol']}, full ranking ({res.get('selection', 'no training')})"
    print(metrics_table(rows, title))
    note = _whole_catalogue_note(res, tuple(cfg.eval.ks))
    if note:
        print(note)
    print(f"results: {res['run_dir']}/metrics.json")
    return 0


def _whole_catalogue_note(res: dict[str, Any], ks: tuple[int, ...]) -> str | None:
    """A line when a cut-off K (``eval.ks``) reaches the catalogue's size: every item is in the
    top K there, so HR@K is 1 by construction (a tiny catalogue, not a good model)."""
    from .runs import Run

    try:
        items = (Run(res["run_dir"]).info() or {})["dataset"]["items"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    over = sorted(k for k in ks if k >= items)
    if not over:
        return None
    return (
        f"note: cut-off{'s' if len(over) > 1 else ''} {', '.join(map(str, over))} reach{'' if len(over) > 1 else 'es'} the catalogue's "
        f"{items:,} items: every item is in the top K, so HR@K is 1 there (--set eval.ks=... sets the cut-offs)"
    )


RESUME_APPLIES = ("resume", "epochs", "device", "no_progress", "print_config")  # what train --resume takes from the command line


def _resume_ignores(args: argparse.Namespace) -> list[str]:
    """The options given with ``train --resume`` that it does not apply (every one set away from
    its default, ``option_defaults`` from the parser, but :data:`RESUME_APPLIES`), as the user spelt them."""
    defaults = getattr(args, "option_defaults", {})
    spelt = {"data_path": "--source", "overrides": "--set"}
    return [
        spelt.get(k, "--" + k.replace("_", "-"))
        for k, default in defaults.items()
        if k not in RESUME_APPLIES and getattr(args, k, default) not in (default, None)
    ]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runs import evaluate_run

    res = evaluate_run(args.run, args.split, args.checkpoint, args.device or "auto")
    if args.json:  # stdout is the JSON alone, for scripts
        print(json.dumps(res, indent=2))
        return 0
    print(
        metrics_table(
            split_rows(args.split, res[args.split]), f"{res['model']} on {res['dataset']}, protocol {res['protocol']}, checkpoint {res['checkpoint']}"
        )
    )
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from .config import DataConfig
    from .data import check_expected, load_dataset, own_data_name
    from .shapes import DATASETS, choose_shape

    cfg = DataConfig(name=args.name if args.name else (own_data_name(args.data_path) if args.data_path else "demo"))
    cfg.path = args.data_path
    cfg.data_dir = args.data_dir
    cfg.ordering = args.ordering
    if args.overrides:
        from .config import Config, apply_overrides, validate

        apply_overrides(Config(data=cfg), args.overrides)  # edits cfg in place
        validate(Config(data=cfg))  # and spells data.sep as the readers take it
    ds = load_dataset(cfg, rebuild=getattr(args, "rebuild", False), log_notes=False)  # its notes are printed below, once
    st = ds.stats
    print(f"dataset {ds.name}  (cache: {ds.cache_dir})")
    print(f"  users {st['users']:,}   items {st['items']:,}   interactions {st['interactions']:,}")
    pct = st["seq_len_percentiles"]
    print(
        "  sequence length: mean {:.1f}; min {:.0f}, p25 {:.0f}, median {:.0f}, p75 {:.0f}, p90 {:.0f}, p99 {:.0f}, max {:.0f}".format(
            st["seq_len_mean"], *[pct[k] for k in ("0", "25", "50", "75", "90", "99", "100")]
        )
    )
    if ds.has_timestamps:
        import datetime as dt

        f = lambda s: dt.datetime.fromtimestamp(s, dt.timezone.utc).strftime("%Y-%m-%d")  # noqa: E731
        print(f"  time span: {f(st['time_min'])} to {f(st['time_max'])} ({st['time_span_days']:.0f} days)")
    else:
        print("  timestamps: none (order only); the temporal attention channel is disabled for this dataset")
    from .data.repeats import repeat_summary
    from .eval.evaluator import resolve_history

    proto = "loo-val"  # the default protocol (users too short for a validation target have a test target only)
    rep = repeat_summary(ds, proto)
    targets = ", ".join(f"{s} {rep[f'{s}_repeat_targets']:,} of {rep[f'{s}_targets']:,}" for s in ("valid", "test") if f"{s}_targets" in rep)
    print(f"  repeats: {rep['repeat_rate']:.2%} of events repeat an earlier item of the user; repeat targets ({proto}): {targets}")
    print(f"  {resolve_history('auto', ds, proto)[1]}")
    shape, why = (DATASETS[ds.name].shape, "its named shape") if ds.name in DATASETS and ds.name != "file" else choose_shape(st)
    print(f"  shape: {shape} ({why})")
    for n in st.get("notes", []):
        print(f"  note: {n}")
    for w in check_expected(ds):
        print(w)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import Budget, Study, default_space, load_space
    from .tune.report import render

    base = build_config(args)
    space = load_space(args.space) if args.space else default_space(base.model.name)
    size = args.size or (base.preset.rsplit("-", 1)[-1] if base.preset.endswith(("-base", "-large")) else "base")
    out = args.out or os.path.join("tune", f"{base.data.name}-{base.model.name}-{size}")
    parallel = args.parallel
    if parallel is None:
        from .experiments.plan import visible_gpus

        parallel = 4 * len(visible_gpus()) if base.train.device != "cpu" and visible_gpus() else 1
    if args.trials < 1 or parallel < 1:
        raise ValueError(f"--trials ({args.trials}) and --parallel ({parallel}) must be at least 1")
    study = Study(out, base, space, sampler=args.sampler, seed=args.search_seed, prune=not args.no_prune, keep_checkpoints=args.keep_checkpoints)
    from .utils.mps import mps_daemon

    with mps_daemon(args.mps):
        res = study.run(Budget(trials=args.trials, seconds=args.time_budget, parallel=parallel))
    if not args.no_test and res.get("best"):
        study.test_best(base.train.device)
        res = json.loads((study.out / "results.json").read_text())
    print(render(res))
    print(f"results: {study.out}/results.md; the best config: {study.out}/best.yaml (fuxi-mme train --config it)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import all_presets, build_preset, parse_preset
    from .shapes import DATASETS, SHAPES

    names = all_presets()
    if args.show:
        print(build_preset(args.show).to_json())
        return 0
    print("Data shapes (own data gets the one measured from it; --shape NAME picks another):")
    for s in SHAPES.values():
        print(f"  {s.name:15s} {s.about}; max_len={s.max_len}, epochs={s.epochs}, dropout={s.dropout}, loss={s.loss}")
    print("Presets (<dataset>-<model>-<size>); `fuxi-mme presets --show NAME` prints one in full.")
    for ds, defaults in DATASETS.items():
        mine = [n for n in names if parse_preset(n)[0] == ds]
        print(f"  {ds} (shape {defaults.shape}):")
        for n in mine:
            c = build_preset(n)
            m = c.model
            desc = "no parameters" if m.name == "popularity" else f"d={m.dim} L={m.num_layers} H={m.num_heads}"
            if m.name == "fuxi-mme":
                desc += f" M={m.num_embeddings} E={m.moe.num_experts} top{m.moe.top_k}"
            print(f"    {n:34s} {desc}, max_len={c.data.max_len}, epochs={c.train.epochs}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import SUITES, aggregate, markdown, run_suites, write_docs
    from .experiments.logs import pack_logs
    from .experiments.own import command_data
    from .experiments.plan import aggregation_jobs

    unknown = [n for n in args.suite if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite {', '.join(map(repr, unknown))}; known: {', '.join(SUITES)}")
    suites = [SUITES[n] for n in dict.fromkeys(args.suite)]
    if args.variants:
        known = {v for s in suites for v in [*s.variants, *(v for _, more in s.extra for v in more)]}
        bad = [v for v in args.variants if v not in known]
        if bad:
            raise ValueError(f"unknown variant {', '.join(map(repr, bad))} of {', '.join(args.suite)}; known: {', '.join(sorted(known))}")
    if args.seeds:  # these seeds for every variant, in the runs and in the tables (copies: SUITES stays as defined)
        suites = [dataclasses.replace(s, seeds=list(args.seeds), model_seeds={}) for s in suites]
    root = Path(args.root)
    data_root = Path(args.data_root) if args.data_root else None
    docs = Path(args.docs) if args.docs else root / "results.md"
    own, datasets = command_data(args.sources, args.datasets, args.overrides, args.variants, suites)
    if args.aggregate_only:
        from .utils.runinfo import git_commit

        if args.pack_logs:
            for s in suites:
                if (root / s.name).is_dir():
                    print(f"{root / s.name}: packed {pack_logs(root / s.name)} per-epoch log files into logs.tar.xz")
        commit = git_commit()
        results = [aggregate(s, aggregation_jobs(s, root, data_root, args.overrides, datasets, args.variants, own), root, [], commit) for s in suites]
        write_docs(root, docs, _experiment_command(args))
    else:
        from .utils.mps import mps_daemon

        if args.time_budget is not None and args.time_budget <= 0:
            raise ValueError(f"--time-budget must be positive seconds, got {args.time_budget}")
        with mps_daemon(args.mps):
            results = run_suites(
                suites,
                root,
                data_root,
                args.jobs,
                args.overrides,
                datasets,
                docs=docs,
                variants=args.variants,
                rerun=args.rerun,
                time_budget=args.time_budget,
                reuse=args.reuse,
                own=own,
                command=_experiment_command(args),
            )
    for res in results:
        print(markdown(res))
    return 1 if any(res["failed"] for res in results) else 0


def _experiment_command(args: argparse.Namespace) -> str:
    """The experiment command as typed (its options in a fixed order), for the page it writes."""
    import shlex

    words = ["fuxi-mme", "experiment", *args.suite, "--root", args.root]
    for flag, values in (("--data-root", [args.data_root] if args.data_root else []), ("--source", args.sources or [])):
        for v in values:
            words += [flag, v]
    for flag, values in (("--datasets", args.datasets), ("--variants", args.variants), ("--seeds", args.seeds)):
        if values:
            words += [flag, *map(str, values)]
    for o in args.overrides:
        words += ["--set", o]
    if args.docs:
        words += ["--docs", args.docs]
    return shlex.join(words)


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments.report import report

    res = report(args.runs, args.out)
    plots = f" and {', '.join(res['images'])}" if res["images"] else " (no plots: they need the [plots] extra, pip install 'fuxi-mme[plots]')"
    print(f"wrote {res['markdown']}{plots}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .serve import Query, Recommender, RequestError

    given = [flag for flag, v in (("--items", args.items), ("--user", args.user), ("--input", args.input)) if v]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are each a whole request; give one of them")
    rec = Recommender.from_run(args.run, args.checkpoint, args.device or "cpu", args.unknown_items)
    if args.input:
        from .serve.batch import recommend_file

        if not args.output:
            raise ValueError("--input needs --output FILE (.csv, .tsv, .parquet or .jsonl)")
        if not Path(args.input).exists():
            raise ValueError(f"--input {args.input} does not exist; give the file of user histories to recommend for")
        st = recommend_file(
            rec, args.input, args.output, args.k, args.exclude_seen, user_col=args.user_col, item_col=args.item_col, time_col=args.time_col
        )
        print(
            f"wrote {st['rows']:,} recommendations for {st['users']:,} users to {args.output}"
            + (f" ({st['skipped']} skipped, see above)" if st["skipped"] else "")
        )
        return 0
    if args.user is not None:
        q = rec.history_of(args.user)
    elif args.items:
        q = Query(_ids(args.items), args.timestamps, behaviors=args.behaviors)
    else:
        raise ValueError("give a history with --items ID [ID ...], a dataset user with --user ID, or a file with --input")
    q.k, q.exclude_seen, q.now = args.k, args.exclude_seen, args.now
    try:
        res = rec.recommend([q])[0]
    except RequestError as exc:
        raise ValueError(str(exc)) from exc
    if args.json:
        print(json.dumps(res, indent=2, default=str))
        return 0
    if sys.stdout.isatty():  # a heading for a reader; a pipe or file gets the bare lines scripts parse
        print(f"rank {'item':>10}  {'score':>7}  title")
    for r, it in enumerate(res["items"], start=1):
        print(f"{r:3d}. {it['item']!s:>10}  {it['score']:+.4f}  {it.get('title', '')}")
    if "unknown_items" in res:
        print(f"unknown items (ignored): {', '.join(map(str, res['unknown_items']))}", file=sys.stderr)
    for note in res.get("notes", []):  # the truncation is one of them
        print(f"note: {note}", file=sys.stderr)
    return 0


def _ids(values: list[str]) -> list:
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import serve
    from .serve.listen import check_can_listen

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port; give one in 1-65535 (default 8000)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("fuxi_mme").warning("binding to %s exposes the service beyond this machine; it has no authentication", args.host)
    if args.exported and (args.device or "cpu") != "cpu":
        raise ValueError(f"--exported serves on the CPU (the export is a CPU program); drop --device {args.device} or serve the run with --run")
    if args.runtime != "program" and not args.exported:
        raise ValueError("--runtime applies to --exported DIR; a run (--run) is served by the eager model")
    check_can_listen(args.host, args.port)
    serve(
        args.run,
        args.host,
        args.port,
        args.checkpoint,
        args.device or "cpu",
        args.unknown_items,
        args.max_batch,
        args.max_wait_ms,
        args.max_body_kb * 1024,
        exported=args.exported,
        runtime=args.runtime,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .serve import Recommender
    from .serve.export import export_run

    rec = Recommender.from_run(args.run, args.checkpoint, "cpu")
    res = export_run(rec, args.out, aoti=not args.no_aoti, onnx=not args.no_onnx)
    print(f"wrote {', '.join(res['files'])} to {res['dir']}")
    return 0
