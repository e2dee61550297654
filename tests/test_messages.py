"""User-facing messages fit where they go: a closed pipe is quiet, values print as plain numbers
and text, notes one per line, and every refusal names the known values or the fix."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from fuxi_mme.cli import main
from fuxi_mme.config import Config, ConfigError, validate
from fuxi_mme.data.table import DataError, canonicalize, plain


def test_a_closed_pipe_ends_the_command_quietly():
    cmd = f"{sys.executable} -m fuxi_mme presets | head -1; echo rc ${{PIPESTATUS[0]}} >&2"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("Data shapes") and len(r.stdout.splitlines()) == 1
    # 141 = 128 + SIGPIPE, as a shell reports a writer its reader left (0 if it wrote all first)
    assert r.stderr.strip() in ("rc 141", "rc 0"), r.stderr


def test_values_in_messages_are_plain_numbers_and_text():
    assert [plain(v) for v in (np.int64(-5), np.float64(-5.0), 2.5, np.nan, None, "abc")] == ["-5", "-5", "2.5", "missing", "missing", "'abc'"]
    df = pd.DataFrame({"user": [1, 1, 2], "item": [10, 11, 10], "timestamp": [5, -5, 3]})
    with pytest.raises(DataError, match=r"negative at data row 2 \(line 3, value -5\)"):
        canonicalize(df, "x.csv")
    df["timestamp"] = [5.0, np.nan, 3.0]
    with pytest.raises(DataError, match=r"'timestamp' is empty at data row 2 \(line 3\)") as e:
        canonicalize(df, "x.csv")
    assert "nan" not in str(e.value)
    df["timestamp"], df["rating"] = [5, 6, 3], ["4", "x", "3"]
    with pytest.raises(DataError, match=r"not a number at data row 2 \(line 3, value 'x'\)"):
        canonicalize(df, "x.csv", rating_col="rating")


def test_recommend_prints_notes_one_per_line(monkeypatch, capsys):
    from fuxi_mme import serve

    class Fake:
        def recommend(self, queries):
            return [{"items": [], "unknown_items": ["a", 7], "notes": ["first note", "second note"]}]

    monkeypatch.setattr(serve.Recommender, "from_run", classmethod(lambda cls, *a, **k: Fake()))
    assert main(["recommend", "--run", "r", "--items", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["unknown items (ignored): a, 7", "note: first note", "note: second note"]


@pytest.mark.parametrize(("given", "sep"), [("tab", "\t"), ("\\t", "\t"), ("\t", "\t"), ("whitespace", " "), (" ", " "), (";", ";"), ("::", "::")])
def test_data_sep_spellings(given, sep):
    cfg = Config()
    cfg.data.sep = given
    validate(cfg)
    assert cfg.data.sep == sep


def test_an_empty_or_long_data_sep_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("user,item,timestamp\n1,10,1\n1,11,2\n")
    assert main(["data", "info", "file", "--source", str(tmp_path / "a.csv"), "--set", "data.sep= "]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.sep is empty" in err and "whitespace" in err and "Py_UCS4" not in err
    cfg = Config()
    cfg.data.sep = "ab"
    with pytest.raises(ConfigError, match="data.sep='ab' is not one character"):
        validate(cfg)


def test_an_unknown_model_or_dataset_lists_the_known_ones(capsys):
    assert main(["train", "--model", "nosuch", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuch' (--model)" in err and "fuxi-mme, fuxi-alpha, hstu, sasrec, llama, ssm, popularity" in err
    assert main(["train", "--dataset", "nosuch", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nosuch'" in err and "demo, ml-100k, ml-1m" in err and "--source FILE" in err


def test_report_without_matplotlib_names_the_extra(monkeypatch, capsys):
    from fuxi_mme.experiments import report

    monkeypatch.setattr(report, "report", lambda runs, out: {"markdown": f"{out}/report.md", "images": [], "runs": 1})
    assert main(["report", "run", "--out", "rep"]) == 0
    assert "pip install 'fuxi-mme[plots]'" in capsys.readouterr().out


def test_a_history_of_the_whole_catalogue_gets_a_note_not_a_silent_empty_list():
    from fuxi_mme.data import load_dataset
    from fuxi_mme.models import build_model
    from fuxi_mme.serve import Query, Recommender

    cfg = tiny_config("sasrec", **{"data.demo_users": 50})
    ds = load_dataset(cfg.data)
    rec = Recommender(cfg, ds, build_model(cfg.model, ds.num_items, cfg.data.max_len))
    every = [x.item() for x in ds.item_raw[1:]]
    res = rec.recommend([Query(every, k=5, exclude_seen=True)])[0]
    assert res["items"] == [] and any("every item of the catalogue is in the history" in n and "exclude_seen=false" in n for n in res["notes"])
    res = rec.recommend([Query(every[3:], k=5, exclude_seen=True)])[0]
    assert len(res["items"]) == 3 and any(f"all but 3 of the {ds.num_items} items" in n for n in res["notes"])
    res = rec.recommend([Query(every, k=5, exclude_seen=False)])[0]
    assert len(res["items"]) == 5 and not any("exclude_seen" in n for n in res.get("notes", []))


def test_repeat_rows_of_each_split_are_kept_apart():
    from fuxi_mme.commands import metrics_table, split_rows

    rows = {}
    rows.update(split_rows("valid (epoch 3)", {"NDCG@10": 0.1, "repeat_targets": {"NDCG@10": 0.2}, "new_targets": {"NDCG@10": 0.3}}))
    rows.update(split_rows("test", {"NDCG@10": 0.4, "repeat_targets": {"NDCG@10": 0.5}, "new_targets": {"NDCG@10": 0.6}}))
    lines = metrics_table(rows).splitlines()[1:]
    assert [ln.split()[-1] for ln in lines] == ["0.1000", "0.2000", "0.3000", "0.4000", "0.5000", "0.6000"]
    assert lines[1].strip().startswith("valid: repeat targets") and lines[4].strip().startswith("test: repeat targets")


def test_history_buckets_are_printed_as_rows_with_their_users():
    from fuxi_mme.commands import metrics_table, split_rows

    buckets = {"short": {"users": 1200, "NDCG@10": 0.05}, "long": {"users": 34, "NDCG@10": 0.25}}
    rows = {**split_rows("valid (epoch 2)", {"NDCG@10": 0.1, "buckets": buckets}), **split_rows("test", {"NDCG@10": 0.2, "buckets": buckets})}
    lines = metrics_table(rows).splitlines()[1:]
    assert [ln.split()[-1] for ln in lines] == ["0.1000", "0.0500", "0.2500", "0.2000", "0.0500", "0.2500"]
    assert lines[1].strip().startswith("valid: short history (< 10), 1,200 users")
    assert lines[5].strip().startswith("test: long history (>= 50), 34 users")
    assert "users" not in metrics_table(rows).splitlines()[0]  # the count is in the label, not a column
