"""Layout detection and reading (fuxi_mme.data.formats) on self-made fixtures of every layout."""

import gzip
import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import zip_bytes
from fuxi_mme.data.formats import detect
from fuxi_mme.data.readers import read
from fuxi_mme.data.table import DataError

S3REC = "1 10 11 12\n2 13 10\n3 11 12 13 14\n"
SASREC = "1 10\n1 11\n2 12\n2 10\n3 11\n"
ML = "1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\n"
CSV_HEADER = "user,item,timestamp\n1,10,100\n1,11,200\n2,10,150\n"
CSV_BARE = "1,10,100\n1,11,200\n2,10,150\n"
TSV = "196\t242\t3\t881250949\n186\t302\t1\t891717742\n196\t302\t4\t881251000\n"
OTTO = (
    '{"session":0,"events":[{"aid":11,"ts":1659304800025,"type":"clicks"},{"aid":12,"ts":1659304904511,"type":"carts"}]}\n'
    '{"session":1,"events":[{"aid":12,"ts":1659367439426,"type":"orders"}]}\n'
)
TABLE = pd.DataFrame({"user": [1, 1, 2], "item": [10, 11, 10], "timestamp": [100, 200, 150]})


def _parquet_bytes(df: pd.DataFrame = TABLE) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


# name, content, format, a phrase of the reason, expected (user, item, timestamp) rows, has_timestamps
CASES = {
    "Beauty.txt": (S3REC, "sequences", "S3-Rec sequence layout", [(1, 10, 0), (1, 11, 1), (1, 12, 2), (2, 13, 3), (2, 10, 4)], False),
    "sasrec.txt": (SASREC, "pairs", "SASRec layout `user item`", [(1, 10, 0), (1, 11, 1), (2, 12, 2), (2, 10, 3), (3, 11, 4)], False),
    "ratings.dat": (ML, "movielens", "MovieLens user::item::rating::timestamp", [(1, 10, 978300760), (1, 11, 978302109), (2, 10, 978301968)], True),
    "header.csv": (CSV_HEADER, "table", "comma-separated text with a header row", [(1, 10, 100), (1, 11, 200), (2, 10, 150)], True),
    "bare.csv": (CSV_BARE, "table", "no header row: columns by position user,item,timestamp", [(1, 10, 100), (1, 11, 200), (2, 10, 150)], True),
    "u.data": (TSV, "table", "tab-separated text, 4 columns", [(196, 242, 881250949), (186, 302, 891717742), (196, 302, 881251000)], True),
    "interactions.parquet": (_parquet_bytes(), "table", "Parquet (magic PAR1)", [(1, 10, 100), (1, 11, 200), (2, 10, 150)], True),
    "otto.jsonl": (OTTO, "sessions", "OTTO session layout", [(0, 11, 1659304800), (0, 12, 1659304904), (1, 12, 1659367439)], True),
}


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _rows(df: pd.DataFrame) -> list[tuple[int, int, int]]:
    return list(zip(df["user"].tolist(), df["item"].tolist(), df["timestamp"].tolist()))


def _check(df: pd.DataFrame, rows, has_ts: bool) -> None:
    assert _rows(df)[: len(rows)] == rows
    assert df.attrs["has_timestamps"] is has_ts
    assert df["timestamp"].dtype == np.int64 and df["user"].dtype == np.int64 and df["item"].dtype == np.int64
    assert df.attrs["notes"] and "\n" not in df.attrs["notes"][0]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_each_layout_is_detected_and_read(tmp_path, name, compression):
    content, fmt, phrase, rows, has_ts = CASES[name]
    raw = content.encode() if isinstance(content, str) else content
    f = _write(tmp_path / (name + (".gz" if compression == "gzip" else "")), gzip.compress(raw) if compression == "gzip" else raw)
    det = detect(f)
    assert (det.format, det.compression) == (fmt, compression)
    assert phrase in det.reason and "\n" not in det.reason
    _check(read(f, det), rows, has_ts)


def test_detection_reads_content_not_suffix(tmp_path):
    # a gzip named .txt and an S3-Rec file named .csv
    det = detect(_write(tmp_path / "data.txt", gzip.compress(ML.encode())))
    assert (det.format, det.compression, det.sep) == ("movielens", "gzip", "::")
    assert detect(_write(tmp_path / "seq.csv", S3REC)).format == "sequences"


def test_movielens_rating_and_otto_behavior_columns(tmp_path):
    f = _write(tmp_path / "ratings.dat", ML)
    assert read(f, detect(f))["rating"].tolist() == [5.0, 3.0, 4.0]
    f = _write(tmp_path / "otto.jsonl", OTTO)
    df = read(f, detect(f))
    assert df["behavior"].tolist() == ["clicks", "carts", "orders"]
    assert any("milliseconds" in n for n in df.attrs["notes"])
    f = _write(tmp_path / "u.data", TSV)
    assert read(f, detect(f))["rating"].tolist() == [3.0, 1.0, 4.0]


def test_a_headerless_third_column_of_ratings_is_not_read_as_time(tmp_path):
    """`user,item,rating` without a header: a third column of 1-5 stars is a rating (no
    timestamps: the file order is the sequence order), not a timestamp that would order each
    history by its ratings; a third column of times stays the timestamp."""
    f = _write(tmp_path / "uir.csv", b"1,10,5\n1,11,3\n2,10,4\n2,12,4.5\n")
    df = read(f, detect(f))
    assert df["rating"].tolist() == [5.0, 3.0, 4.0, 4.5] and df["item"].tolist() == [10, 11, 10, 12]  # file order kept
    assert df.attrs["has_timestamps"] is False
    assert any("read as a rating, not a timestamp" in n and "values 3 to 5 (4 distinct)" in n for n in df.attrs["notes"])
    f = _write(tmp_path / "uit.csv", b"1,10,978300760\n1,11,978300761\n2,10,978300770\n")
    df = read(f, detect(f))
    assert "rating" not in df and df["timestamp"].tolist() == [978300760, 978300761, 978300770] and df.attrs["has_timestamps"] is not False


def test_a_json_array_file_says_to_convert_it_to_json_lines(tmp_path):
    for text in (b'[{"user": 1, "item": 2}, {"user": 1, "item": 3}]\n', b'[\n  {"user": 1, "item": 2}\n]\n'):
        f = _write(tmp_path / "arr.json", text)
        with pytest.raises(DataError, match=r"is one JSON array; the reader takes JSON lines, one object per line: convert it") as err:
            detect(f)
        assert "\n" not in str(err.value)


def test_zip_with_one_member_and_hidden_files(tmp_path):
    f = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("ml-1m/ratings.dat", ML)
        z.writestr("__MACOSX/ml-1m/._ratings.dat", "junk")
    det = detect(f)
    assert (det.format, det.compression, det.member) == ("movielens", "zip", "ml-1m/ratings.dat")
    assert "zip member ml-1m/ratings.dat" in det.reason
    assert _rows(read(f, det)) == CASES["ratings.dat"][3]


def test_parquet_folder_as_spark_writes_it(tmp_path):
    d = tmp_path / "events.parquet"
    d.mkdir()
    _write(d / "part-00000-abc.snappy.parquet", _parquet_bytes(TABLE.iloc[:2]))
    _write(d / "part-00001-abc.snappy.parquet", _parquet_bytes(TABLE.iloc[2:]))
    _write(d / "_SUCCESS", b"")
    _write(d / ".part-00000-abc.snappy.parquet.crc", b"\x00crc")
    det = detect(d)
    assert (det.format, det.container) == ("table", "parquet-folder") and "2 Parquet part(s)" in det.reason
    assert _rows(read(d, det)) == CASES["header.csv"][3]


def test_named_columns_aliases_and_no_time_column(tmp_path):
    f = _write(tmp_path / "ml20m.csv", "userId,movieId,rating,timestamp\n1,10,4.0,5\n1,11,3.5,6\n")
    df = read(f, detect(f), rating_col="rating")
    assert _rows(df) == [(1, 10, 5), (1, 11, 6)] and df["rating"].tolist() == [4.0, 3.5]
    f = _write(tmp_path / "names.tsv", "who\twhat\nu1\ti1\nu1\ti2\nu2\ti1\n")
    det = detect(f)
    assert det.header is False  # no numbers under the names, no known name: rows by position
    df = read(f, det, header=True, user_col="who", item_col="what")
    assert df["user"].tolist() == ["u1", "u1", "u2"] and df["timestamp"].tolist() == [0, 1, 2]
    assert df.attrs["has_timestamps"] is False and any("file order" in n for n in df.attrs["notes"])


def test_ambiguous_two_and_three_integer_lines(tmp_path):
    assert "headerless 2-column table reads the same" in detect(_write(tmp_path / "a.txt", SASREC)).reason
    det = detect(_write(tmp_path / "b.txt", "1 10 100\n2 11 200\n"))
    assert det.format == "table" and "constant 3 or 4 whitespace integers is a table" in det.reason
    assert detect(_write(tmp_path / "c.txt", "1 2 3 4 5\n2 3 4 5 6\n")).format == "sequences"
    # 5+ fields on every line and a stray non-integer: a sequence file with a bad id, not a table
    det = detect(_write(tmp_path / "d.txt", "1 2 3 4 5 6\n2 3 4 a4 5 6\n3 4 5 6 7 8\n"))
    assert det.format == "sequences" and "whitespace-separated fields, 6 per line: S3-Rec sequence layout" in det.reason
    # mostly text: still no sequence file (a table without a header, which then asks for one)
    assert detect(_write(tmp_path / "e.txt", "a b c d e\nf g h i j\n")).format == "table"


BAD = {
    "sequence line with 1 field": ("seq.txt", "1 10 11\n2\n3 12 13 14\n", 2, "1 field"),
    # past the lines detection samples, so detection says pairs
    "pairs line with 3 fields": ("pairs.txt", "".join(f"{u} {u + 1}\n" for u in range(2100)) + "5 6 7\n", 2101, "3 field(s)"),
    "'::' mixed with tabs": ("ratings.dat", "1::10::5::978300760\n1\t11\t3\t978302109\n", 2, "no '::' (tab-separated)"),
    "non-numeric id in a sequence file": ("seq.txt", "1 10 11\n2 abc 12 13\n", 2, "'abc' is not an integer id"),
    "non-numeric id, 6 fields on every line": ("seq.txt", "1 2 3 4 5 6\n2 3 4 a4 5 6\n3 4 5 6 7 8\n", 2, "'a4' is not an integer id"),
    "csv row too long": ("t.csv", "user,item\n1,2\n\n3,4,5\n", 4, "3 comma-separated field(s): '3,4,5'; expected 2"),
    "csv row too long past the sample": ("t.csv", "\nuser,item\n" + "1,2\n" * 2100 + "3,4,5\n", 2103, "3 comma-separated fields, expected 2"),
    "csv empty item": ("t.csv", "user,item,timestamp\n1,,100\n", 2, "no item id"),
    "negative timestamp": ("t.csv", "user,item,timestamp\n1,2,100\n1,3,-5\n", 3, "timestamp '-5'"),
    "session with events not a list": (
        "o.jsonl",
        OTTO + OTTO.splitlines(True)[1] * 2100 + '{"session": 3, "events": 7}\n',
        2103,
        "expected an OTTO session",
    ),
    "jsonl broken line": ("o.jsonl", OTTO + "{not json\n", 3, "not valid JSON"),
    "session without events": (
        "o.jsonl",
        OTTO + '{"session": 3, "events": 7}\n',
        3,
        "a flat object (keys session, events) but line 1 is an OTTO session",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layouts_give_one_line_errors_naming_file_and_line(tmp_path, case):
    name, content, line, found = BAD[case]
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        read(f, detect(f))
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg and f"line {line}" in msg and found in msg, msg
    assert "np." not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


@pytest.mark.parametrize(
    "name, content, found",
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"\n  \n", "only blank lines"),
        ("cut.gz", gzip.compress(S3REC.encode() * 50)[:40], "corrupt or truncated gzip file"),
        ("bad.zip", b"PK\x03\x04" + b"\x00" * 40, "corrupt or truncated zip file"),
        ("binary.bin", b"\x01\x02\x00\x03", "NUL byte"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, found):
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError) as err:
        read(f, detect(f))
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg and found in msg, msg
    assert msg.count(str(f)) == 1 and "download" not in msg  # said once; the user's own file, not a download


def test_zip_with_two_members_lists_them(tmp_path):
    f = tmp_path / "two.zip"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("a.csv", CSV_HEADER)
        z.writestr("b.csv", CSV_HEADER)
        z.writestr("_SUCCESS", "")
    with pytest.raises(DataError, match=r"holds 2 data files \(a.csv, b.csv, _SUCCESS\)") as err:
        detect(f)
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("keep one, or unzip it and pass the file") and "corrupt" not in msg, msg


# --------------------------------------------------------------------------- property: never another exception


SEEDS = [c[0].encode() if isinstance(c[0], str) else c[0] for c in CASES.values()] + [
    TSV.encode(),
    CSV_HEADER.encode(),
    zip_bytes({"ml-1m/ratings.dat": ML * 3, "__MACOSX/ml-1m/._ratings.dat": "junk"}),
]


@st.composite
def damaged(draw, seeds: list[bytes] = SEEDS) -> bytes:
    raw = draw(st.sampled_from(seeds))
    if draw(st.booleans()):
        raw = gzip.compress(raw)
    how = draw(st.sampled_from(["truncate", "mutate", "random"]))
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "random":
        return draw(st.binary(max_size=300))
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    return bytes(b)


# the autouse cache fixture of conftest.py is function-scoped; it holds nothing the examples share
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged())
# found by the search: a zip whose central directory names a member with an empty name (zipfile's IndexError)
@example(
    b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x0fb\x86]\xed\xf2\xc1\xcf\xb4\x00\x00\x00\xb4\x00\x00\x00\x11\x00\x00\x00ml-1m/ratings.dat1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\n1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\n1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\nPK\x03\x04\x14\x00\x00\x00\x00\x00\x0fb\x86]9\x9c\xfb\x06\x04\x00\x00\x00\x04\x00\x00\x00\x1c\x00\x00\x00__MACOSX/ml-1m/._ratings.datjunkPK\x01\x02\x14\x03\x14\x00\x00\x00\x00\x00\x0fb\x86]\xed\xf2\xc1\xcf\xb4\x00\x00\x00\xb4\x00\x00\x00\x11\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00ml-1m/ratings.datPK\x01\x02\x14\x03\x14\x00\x00\x00\x00\x00\x0fb\x86]9\x9c\xfb\x06\x04\x00\x00\x00\x04\x00\x00\x00\x1c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x01\xe3\x00\x00\x00\x00_MACOSX/ml-1m/._ratings.datPK\x05\x06\x00\x00\x00\x00\x02\x00\x02\x00\x89\x00\x00\x00!\x01\x00\x00\x00\x00"
)
def test_damaged_inputs_end_in_data_error_or_a_canonical_table(raw):
    with tempfile.TemporaryDirectory() as d:
        f = _write(Path(d) / "input", raw)
        try:
            df = read(f, detect(f))
        except DataError as exc:
            assert "\n" not in str(exc) and "np." not in str(exc)
            return
        assert len(df) > 0 and {"user", "item", "timestamp"} <= set(df.columns)
        assert df["timestamp"].dtype == np.int64
        for c in ("user", "item"):
            assert df[c].dtype == np.int64 or all(isinstance(v, str) for v in df[c])


@st.composite
def damaged_source(draw) -> tuple[str, bytes]:
    """A damaged input as a file, or as the one part of a Parquet folder (Spark's layout)."""
    if draw(st.booleans()):
        return "file", draw(damaged())
    return "parquet-folder", draw(damaged([_parquet_bytes(), _parquet_bytes(TABLE.iloc[:2])]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged_source())
def test_damaged_inputs_prepare_or_leave_nothing_in_the_data_dir(source):
    """Through ``load_dataset`` under the data's own name: a DataError leaves no cache entry and
    no ``NAME.source.json``; a success leaves both."""
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import load_dataset

    container, raw = source
    with tempfile.TemporaryDirectory() as d:
        src, data = Path(d) / "input", Path(d) / "data"
        if container == "parquet-folder":
            src.mkdir()
            _write(src / "part-00000-abc.snappy.parquet", raw)
            _write(src / "_SUCCESS", b"")
        else:
            _write(src, raw)
        data.mkdir()
        try:
            ds = load_dataset(DataConfig(name="mine", path=str(src), data_dir=str(data)))
        except DataError as exc:
            assert "\n" not in str(exc) and "np." not in str(exc)
            assert sorted(data.rglob("*")) == []
            return
        assert ds.stats["interactions"] > 0 and (data / "prepared" / "mine.source.json").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_each_layout_prepares_through_the_file_source_and_is_cached(tmp_path, name):
    """``--source FILE`` with no dataset name goes through the same detection; the prepared
    cache is keyed by the reader, and a forced ``data.format`` is part of the key."""
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import _key_parts, load_dataset

    content, fmt, _, rows, has_ts = CASES[name]
    f = _write(tmp_path / name, content)
    ds = load_dataset(DataConfig(name="file", path=str(f), data_dir=str(tmp_path / "cache")))
    counts = read(f, detect(f))["user"].value_counts()
    assert ds.stats["interactions"] == int(counts[counts >= 2].sum()) and ds.has_timestamps is has_ts  # users with 2+ events
    assert any(fmt in n for n in ds.stats["notes"])
    forced = DataConfig(name="file", path=str(f), format=fmt)
    assert _key_parts(forced, f)["format"] == fmt and "format" not in _key_parts(DataConfig(name="file"), f)


def test_train_on_a_sequence_file_from_the_command_line(tmp_path):
    """``fuxi-mme train --source FILE`` with no preset or dataset name, on an S3-Rec file."""
    import random

    from fuxi_mme.cli import main

    rng = random.Random(0)
    lines = [" ".join(str(x) for x in [u] + [rng.randint(1, 40) for _ in range(rng.randint(4, 12))]) for u in range(1, 61)]
    f = _write(tmp_path / "seq.txt", "\n".join(lines) + "\n")
    sets = [*TRAIN_SETS, f"data.data_dir={tmp_path / 'cache'}"]  # a tiny model (below)
    argv = ["train", "--source", str(f), "--epochs", "1", "--device", "cpu", "--run-dir", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "seq" and 0.0 <= metrics["test"]["NDCG@10"] <= 1.0 and metrics["test"]["users"] == 60
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["name"] == "seq" and config["shape"] == "short"  # the file's stem; median history under 20


def _log_in(layout: str, rng) -> str | bytes:
    """40 users with 5-9 events each (items 1-30, increasing times) in ``layout``."""
    events = []
    for u in range(1, 41):
        t = 1_000_000 + u * 1000
        for _ in range(rng.randint(5, 9)):
            t += rng.randint(1, 500)
            events.append((u, rng.randint(1, 30), t))
    if layout == "sequences":
        by_user: dict[int, list[int]] = {}
        for u, i, _ in events:
            by_user.setdefault(u, []).append(i)
        return "".join(f"{u} {' '.join(map(str, items))}\n" for u, items in by_user.items())
    if layout == "pairs":
        return "".join(f"{u} {i}\n" for u, i, _ in events)
    if layout == "movielens":
        return "".join(f"{u}::{i}::4::{t}\n" for u, i, t in events)
    if layout == "csv-header":
        return "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events)
    if layout == "csv-bare":
        return "".join(f"{u},{i},{t}\n" for u, i, t in events)
    if layout == "parquet":
        return _parquet_bytes(pd.DataFrame(events, columns=["user", "item", "timestamp"]))
    assert layout == "sessions"
    sessions: dict[int, list[dict]] = {}
    for u, i, t in events:
        sessions.setdefault(u, []).append({"aid": i, "ts": t * 1000, "type": "clicks"})
    return "".join(json.dumps({"session": u, "events": ev}) + "\n" for u, ev in sessions.items())


TRAIN_SETS = [
    "data.max_len=10",
    "model.dim=8",
    "model.qk_dim=8",
    "model.v_dim=8",
    "model.ffn_dim=8",
    "train.batch_size=16",
    "train.num_negatives=4",
    "model.num_embeddings=1",
    "model.moe.num_experts=0",
]


@pytest.mark.parametrize(
    "name, layout",
    [
        ("seqs.txt", "sequences"),
        ("pairs.txt", "pairs"),
        ("ratings.dat", "movielens"),
        ("with_header.csv", "csv-header"),
        ("no_header.csv", "csv-bare"),
        ("log.parquet", "parquet"),
        ("log_folder", "parquet-folder"),
        ("sessions.jsonl", "sessions"),
    ],
)
@pytest.mark.parametrize("gzipped", [False, True])
def test_train_from_the_command_line_on_every_layout(tmp_path, name, layout, gzipped):
    """``fuxi-mme train --source FILE`` with no preset or dataset name, on a file of every
    layout (and its gzip; a Parquet folder as Spark writes it): it trains, evaluates every user,
    and names the run after the file."""
    import random

    from fuxi_mme.cli import main

    if layout == "parquet-folder":
        if gzipped:
            pytest.skip("a folder is not gzipped")
        src = tmp_path / name
        src.mkdir()
        _write(src / "part-00000-abc.snappy.parquet", _log_in("parquet", random.Random(0)))
        _write(src / "_SUCCESS", b"")
    else:
        content = _log_in(layout, random.Random(0))
        raw = content.encode() if isinstance(content, str) else content
        src = _write(tmp_path / (name + ".gz" if gzipped else name), gzip.compress(raw) if gzipped else raw)
    argv = ["train", "--source", str(src), "--epochs", "1", "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    for s in [*TRAIN_SETS, f"data.data_dir={tmp_path / 'cache'}"]:
        argv += ["--set", s]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    stem = name.split(".")[0]
    assert metrics["dataset"] == stem and metrics["test"]["users"] == 40 and 0.0 <= metrics["test"]["NDCG@10"] <= 1.0
