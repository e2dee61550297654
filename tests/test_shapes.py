"""Defaults by data shape: named presets unchanged, own data measured and given its shape's defaults."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from fuxi_mme.cli import main
from fuxi_mme.experiments.plan import _flat  # dotted keys, tuples as lists
from fuxi_mme.presets import all_presets, build_defaults, build_preset
from fuxi_mme.shapes import DATASETS, FEW_USERS, MANY_INTERACTIONS, SHORT_MEDIAN_LENGTH, choose_shape

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PINNED = Path(__file__).parent / "data" / "presets-pinned.json"


def test_every_named_preset_resolves_to_the_config_pinned_before_shapes():
    """Every preset's resolved config, pinned before presets moved to shapes: no published row
    changes. Fields added since (a new option at its default) are not in the pinned file."""
    pinned = json.loads(PINNED.read_text())
    added_families = ("-ssm-",)  # model families added since the pin: their presets are new
    assert sorted(pinned) == sorted(n for n in all_presets() if not any(f in n for f in added_families))
    for name, old in pinned.items():
        now = _flat(json.loads(build_preset(name).to_json()))
        changed = {k: (v, now.get(k)) for k, v in _flat(old).items() if now.get(k) != v}
        assert not changed, (name, changed)


def _stats(median: float, users: int, interactions: int, ts: bool = True) -> dict:
    return {"seq_len_percentiles": {"50": median}, "users": users, "items": 1000, "interactions": interactions, "has_timestamps": ts}


def test_shape_rules_at_their_thresholds():
    assert choose_shape(_stats(6, 22_363, 198_502, ts=False))[0] == "short"  # Amazon Beauty
    assert choose_shape(_stats(SHORT_MEDIAN_LENGTH - 0.5, 50_000, 10**6))[0] == "short"
    assert choose_shape(_stats(SHORT_MEDIAN_LENGTH, 50_000, 10**6))[0] == "long"
    assert choose_shape(_stats(65, 943, 100_000))[0] == "long-few-users"  # ML-100K
    assert choose_shape(_stats(65, FEW_USERS, 100_000))[0] == "long"
    assert choose_shape(_stats(96, 6_040, 1_000_209))[0] == "long"  # ML-1M
    assert choose_shape(_stats(68, 138_493, 20_000_263))[0] == "long-large"  # ML-20M
    assert choose_shape(_stats(68, 138_493, MANY_INTERACTIONS - 1))[0] == "long"
    why = choose_shape(_stats(6, 22_363, 198_502, ts=False))[1]
    assert "median history 6 events" in why and "no timestamps" in why and "Amazon-like" in why


def test_every_named_dataset_has_a_shape_and_the_shapes_their_presets():
    for name, d in DATASETS.items():
        cfg = build_preset(f"{name}-fuxi-alpha-base")
        assert cfg.shape == d.shape
        assert cfg.data.max_len == d.overrides.get("max_len", build_defaults(d.shape, "fuxi-alpha", "base", name).data.max_len)


def _write_sequences(path: Path, users: int, lo: int, hi: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(map(str, [u] + [rng.randint(1, 300) for _ in range(rng.randint(lo, hi))])) for u in range(1, users + 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(argv: list[str], capsys) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_own_files_get_the_shape_measured_from_them_under_their_own_name(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    cache = ["--data-dir", str(tmp_path / "cache")]
    short = _write_sequences(tmp_path / "Clicks.txt", 80, 3, 9)
    cfg = _config(["--source", str(short), "--model", "fuxi-mme", "--size", "large", *cache], capsys)
    want = _flat(build_defaults("short", "fuxi-mme", "large", "clicks").to_dict())
    got = _flat(cfg)
    assert got["shape"] == "short" and got["data.name"] == "clicks" and got["preset"] == "clicks-fuxi-mme-large"
    assert {k: v for k, v in got.items() if k not in ("data.path", "data.data_dir")} == {
        k: v for k, v in want.items() if k not in ("data.path", "data.data_dir")
    }
    assert any("shape short" in r.message and "median history" in r.message for r in caplog.records)
    long = _write_sequences(tmp_path / "long.txt", 60, 25, 60)
    cfg = _config(["--source", str(long), "--model", "sasrec", "--name", "mine", *cache], capsys)
    assert cfg["shape"] == "long-few-users" and cfg["data"]["name"] == "mine" and cfg["data"]["max_len"] == 200
    # --shape overrides the measurement; --set still wins over the shape
    cfg = _config(["--source", str(long), "--shape", "short", "--set", "data.max_len=30", *cache], capsys)
    assert cfg["shape"] == "short" and cfg["train"]["loss"] == "full" and cfg["data"]["max_len"] == 30


def test_own_data_prepared_once_is_found_by_its_name_later(tmp_path, capsys):
    cache = ["--data-dir", str(tmp_path / "cache")]
    f = _write_sequences(tmp_path / "log.txt", 50, 3, 8)
    assert main(["data", "prepare", "shop", "--source", str(f), *cache]) == 0  # a name that is not a named dataset: own data
    capsys.readouterr()
    assert main(["data", "info", "shop", *cache]) == 0
    out = capsys.readouterr().out
    assert "dataset shop" in out and "users 50" in out and "shape: short" in out
    cfg = _config(["--dataset", "shop", *cache], capsys)
    assert cfg["data"]["name"] == "shop" and cfg["shape"] == "short"
    # a name nothing was prepared under: one line naming the named datasets and the fix
    assert main(["train", "--dataset", "shopp", *cache, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown dataset 'shopp'" in err and "ml-1m" in err and "--source FILE" in err and "\n" not in err
    # own names are the file's stem in lower case: a capitalised one says so
    assert main(["data", "info", "Shop", *cache]) == 2
    assert "own data is known by its file's stem in lower case: 'shop'" in capsys.readouterr().err


def test_a_name_prepared_from_another_file_says_so(tmp_path, caplog):
    import logging

    cache = ["--data-dir", str(tmp_path / "cache")]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _write_sequences(tmp_path / "a" / "train.txt", 30, 3, 8)
    second = _write_sequences(tmp_path / "b" / "train.txt", 30, 3, 8, seed=1)
    assert main(["data", "prepare", "--source", str(first), *cache]) == 0
    with caplog.at_level(logging.WARNING, logger="fuxi_mme.data"):
        assert main(["data", "prepare", "--source", str(first), *cache]) == 0  # the same file again: nothing to say
        assert not caplog.records
        assert main(["data", "prepare", "--source", str(second), *cache]) == 0
    assert f"train: this name now means {second} (it was prepared from {first} before)" in caplog.text


@pytest.mark.parametrize(
    "path,name",
    [
        ("data/Beauty.txt", "beauty"),
        ("x/ratings.csv.gz", "ratings"),
        ("events_parquet/", "events_parquet"),
        ("My Log.JSONL", "my-log"),
        ("ml-1m.csv", "file-ml-1m"),
        ("u.data", "u.data"),
    ],
)
def test_own_data_name_is_the_stem(path, name):
    from fuxi_mme.data import own_data_name

    assert own_data_name(path) == name


AMAZON = {"amazon-beauty": "Beauty.txt", "amazon-sports": "Sports_and_Outdoors.txt", "amazon-toys": "Toys_and_Games.txt"}


@pytest.mark.parametrize("dataset", sorted(AMAZON))
def test_amazon_files_as_own_data_resolve_to_the_amazon_presets(dataset, tmp_path, capsys):
    f = SHARED / "amazon_s3rec" / AMAZON[dataset]
    if not f.is_file():
        pytest.skip(f"{f} not present")
    for model in ("fuxi-mme", "fuxi-alpha", "sasrec"):
        for size in ("base", "large"):
            got = _flat(_config(["--source", str(f), "--model", model, "--size", size, "--data-dir", str(tmp_path)], capsys))
            want = _flat(build_preset(f"{dataset}-{model}-{size}").to_dict())
            differ = {k for k in set(got) | set(want) if got.get(k) != want.get(k)}
            assert differ == {"data.name", "data.path", "data.data_dir", "preset"}, (model, size, differ)


def test_ml_1m_ts70_measures_as_the_movielens_group(tmp_path):
    if not (SHARED / "ml-1m" / "ratings_timestamped_subset.dat.gz").is_file():
        pytest.skip("ML-1M files not present")
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import load_dataset

    ds = load_dataset(DataConfig(name="ml-1m-ts70", path=str(SHARED / "ml-1m"), data_dir=str(tmp_path)))
    shape = choose_shape(ds.stats)[0]
    assert shape == DATASETS["ml-1m-ts70"].shape == "long"
    for model in ("fuxi-mme", "fuxi-alpha", "sasrec"):
        assert build_defaults(shape, model, "base", "ml-1m-ts70").to_dict() == build_preset(f"ml-1m-ts70-{model}-base").to_dict()


def test_a_run_trained_from_a_relative_source_is_evaluated_from_another_folder(tmp_path, capsys, monkeypatch):
    """The config keeps the --source as an absolute path, so `evaluate --run` works from any
    folder; a run whose config still holds a relative path (older runs) finds the file it was
    prepared from by the dataset's name."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    _write_sequences(work / "shop.txt", 40, 4, 12)
    cache = ["--data-dir", str(tmp_path / "cache")]
    run = tmp_path / "run"
    monkeypatch.chdir(work)
    tiny = ["--set", "model.dim=8", "--set", "model.qk_dim=8", "--set", "model.v_dim=8", "--set", "data.max_len=10"]
    argv = ["train", "--source", "shop.txt", "--model", "fuxi-alpha", *cache, "--run-dir", str(run), "--epochs", "1", "--device", "cpu"]
    argv += ["--no-progress", *tiny, "--set", "eval.ks=10,500"]
    assert main(argv) == 0
    items = json.loads((run / "run.json").read_text())["dataset"]["items"]  # at most 300
    # a cut-off at or above the catalogue's size gets a line: every item is in its top K
    assert f"note: cut-off 500 reaches the catalogue's {items} items" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["path"] == str(work / "shop.txt")
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    assert "NDCG@10" in capsys.readouterr().out
    cfg["data"]["path"] = "shop.txt"  # as runs before this change wrote it
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
