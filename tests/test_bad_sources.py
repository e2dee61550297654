"""Bad ``--source`` inputs from the command line: one-line errors worded for the user's own
file, and nothing left in the data folder (no cache, no ``NAME.source.json``, no raw folder)."""

import gzip
import io
import logging
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import zip_bytes
from fuxi_mme.cli import main
from fuxi_mme.data import DataError
from fuxi_mme.data.download import download, safe_extract


def _cut_tgz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        data = "".join(f"{u}::{i}::5::{978300000 + i}\n" for u in range(1, 200) for i in range(1, 30)).encode()
        info = tarfile.TarInfo("ml-1m/ratings.dat")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()[: len(buf.getvalue()) // 2]


# file name, content, a phrase of the error
BAD = {
    "corrupt zip": ("corrupt.zip", b"PK\x03\x04" + b"garbage" * 10, "corrupt.zip is a corrupt or truncated zip file"),
    "empty file": ("empty.txt", b"", "empty.txt is empty"),
    "non-numeric id": ("seq.txt", b"1 10 11\n2 abc 12 13\n", "seq.txt: line 2: 'abc' is not an integer id"),
    "non-numeric id, 6 fields a line": ("nonnum.txt", b"1 2 3 4 5 6\n2 3 4 a4 5 6\n3 4 5 6 7 8\n", "nonnum.txt: line 2: 'a4' is not an integer id"),
    "truncated gzip": ("cut.gz", gzip.compress(b"1 10 11 12\n" * 200)[:40], "cut.gz is a corrupt or truncated gzip file"),
    "zip of two files": (
        "two.zip",
        zip_bytes({"a.csv": "user,item\n1,2\n", "b.csv": "user,item\n1,2\n"}),
        "two.zip holds 2 data files (a.csv, b.csv); expected exactly one interactions file: keep one, or unzip it and pass the file",
    ),
}


def _leftovers(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data)) for p in data.rglob("*"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("fuxi-mme: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["train", "prepare"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_source_leaves_nothing_in_the_data_dir(tmp_path, capsys, case, command):
    name, content, phrase = BAD[case]
    f = tmp_path / "in" / name
    f.parent.mkdir()
    f.write_bytes(content)
    data = tmp_path / "data"
    data.mkdir()
    if command == "train":
        argv = ["train", "--source", str(f), "--device", "cpu", "--epochs", "1", "--run-dir", str(tmp_path / "run"), "--data-dir", str(data)]
    else:
        argv = ["data", "prepare", "mine", "--source", str(f), "--data-dir", str(data)]
    assert main(argv) == 2
    msg = _one_line_error(capsys)
    assert phrase in msg and "download" not in msg, msg
    assert msg.count(str(f)) == 1  # said once, not wrapped in a second message
    assert _leftovers(data) == []  # no prepared/<name>.source.json, no cache folder


def test_the_source_is_remembered_once_it_prepared(tmp_path, capsys):
    f = tmp_path / "seq.txt"
    f.write_text("".join(f"{u} {u + 1} {u + 2} {u + 3} {u + 4}\n" for u in range(1, 20)))
    data = tmp_path / "data"
    assert main(["data", "prepare", "mine", "--source", str(f), "--data-dir", str(data)]) == 0
    assert (data / "prepared" / "mine.source.json").exists()
    assert main(["data", "info", "mine", "--data-dir", str(data)]) == 0  # found again without --source
    assert "interactions 76" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("corrupt.zip", b"PK\x03\x04" + b"garbage" * 10, "not a zip archive (File is not a zip file)"),
        ("cut.tar.gz", _cut_tgz(), "not a tar archive (Compressed file ended"),
        ("notar.tar.gz", b"hello", "not a tar archive (not a tar, tar.gz, tar.bz2 or tar.xz file)"),
    ],
)
def test_a_bad_archive_given_for_a_named_dataset(tmp_path, capsys, name, content, why):
    """``data info ml-1m --source BAD``: one line naming the file and what was expected, worded
    for a file the user gave (no "download it again"), and no half-made ``raw/ml-1m`` folder."""
    f = tmp_path / name
    f.write_bytes(content)
    data = tmp_path / "data"
    data.mkdir()
    assert main(["data", "info", "ml-1m", "--source", str(f), "--data-dir", str(data)]) == 2
    msg = _one_line_error(capsys)
    assert f"{f} is truncated, corrupt or {why}" in msg, msg
    assert "expected a zip or tar (.gz, .bz2, .xz) archive" in msg and "--source" in msg and "download" not in msg
    assert _leftovers(data) == []


@pytest.mark.parametrize("dataset, name", [("ml-1m", "ratings.dat"), ("ml-100k", "u.data")])
def test_an_empty_ratings_file_given_for_a_named_dataset(tmp_path, capsys, dataset, name):
    f = tmp_path / name
    f.write_bytes(b"")
    data = tmp_path / "data"
    data.mkdir()
    assert main(["data", "info", dataset, "--source", str(f), "--data-dir", str(data)]) == 2
    msg = _one_line_error(capsys)
    assert f"{f} is empty; expected one rating per line" in msg and "--source" in msg and "download" not in msg, msg
    assert _leftovers(data) == []


def test_a_downloaded_archive_that_is_corrupt_says_download_it_again(tmp_path):
    arc = tmp_path / ".downloads" / "ml-1m.zip"
    arc.parent.mkdir()
    arc.write_bytes(b"PK\x03\x04" + b"garbage" * 10)
    with pytest.raises(DataError) as err:
        safe_extract(arc, tmp_path / "ml-1m")
    assert "\n" not in str(err.value) and str(err.value).endswith("delete it and run the command again to download it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".downloads"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_download_progress_redraws_only_on_a_terminal(tmp_path, monkeypatch, caplog, tty):
    monkeypatch.delenv("FUXI_MME_OFFLINE", raising=False)
    body = bytes(range(256)) * 20_000  # 5 MB: several chunks, so a bar would redraw
    src = tmp_path / "f.bin"
    src.write_bytes(body)
    stream = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    with caplog.at_level(logging.INFO, logger="fuxi_mme.data.download"):
        out = download(src.as_uri(), tmp_path / "out" / "f.bin", progress=True)
    assert out.read_bytes() == body
    if tty:
        assert stream.getvalue().count("\r") > 1  # the bar redraws in place
    else:
        assert stream.getvalue() == ""  # nothing redrawn into a log file
        assert [r.getMessage() for r in caplog.records] == [f"f.bin: {len(body):,} bytes downloaded"]
