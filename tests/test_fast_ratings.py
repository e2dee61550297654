"""The MovieLens ratings reader's fast path (pandas' C parser) gives the careful reader's frame,
and leaves every malformed file to the careful reader, whose errors name the line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fuxi_mme.data import sources
from fuxi_mme.data.table import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COLS = ["user", "item", "rating", "timestamp"]


def _careful(monkeypatch, path: Path, sep: str, cols: list[str]) -> pd.DataFrame:
    with monkeypatch.context() as m:
        m.setattr(sources, "_fast_numeric_table", lambda *a: None)
        return sources._read_sep_ratings(path, sep, cols)


@pytest.mark.parametrize(
    ("text", "sep"),
    [
        ("1::10::5::978300760\n2::20::3::978300761\n", "::"),
        ("1::10::5::978300760\r\n\r\n2::20::3::978300761\r\n", "::"),  # CRLF, a blank line
        ("1\t10\t5\t978300760\n2\t20\t3\t978300761", "\t"),  # no final newline
        ("1\t10\t5\t978300760\n-3\t20\t3\t0\n", "\t"),
        ("1\t10\t5\t9\n   \n2\t20\t3\t9\n", "\t"),  # a line of spaces: skipped, as before
        ("1\t10\t4.5\t978300760\n2\t20\t3\t978300761\n", "\t"),  # a float: left to the careful reader
    ],
)
def test_fast_path_equals_the_careful_reader(tmp_path, monkeypatch, text, sep):
    f = tmp_path / "ratings.dat"
    f.write_bytes(text.encode())
    fast = sources._fast_numeric_table(text, sep, COLS)
    assert (fast is None) == ("4.5" in text)
    pd.testing.assert_frame_equal(sources._read_sep_ratings(f, sep, COLS), _careful(monkeypatch, f, sep, COLS))


@pytest.mark.parametrize(
    ("text", "sep", "error"),
    [
        ("1::10::5::978300760\n2::20::x::978300761\n", "::", "line 2, field 'rating' is not a number ('x')"),
        ("1::10::5::978300760\n2::20::3\n", "::", "line 2 has 3 field(s)"),
        ("1::10::5::978300760::7\n", "::", "line 1 has 5 field(s)"),
        ("1::10::5::978300760\n1::10::5::978300760::7\n", "::", "line 2 has 5 field(s)"),
        ('1\t"10\t5\t978300760\n2\t20"\t3\t978300761\n', "\t", "field 'item' is not a number"),
        ("1,10,5,978300760\n", "\t", "separated by ','"),
        ("1\t10\t5\t9\r2\t20\t3\t9\r", "\t", "line 1 has 7 field(s)"),  # lone carriage returns
    ],
)
def test_malformed_files_go_to_the_careful_reader(tmp_path, text, sep, error):
    f = tmp_path / "ratings.dat"
    f.write_bytes(text.encode())
    assert sources._fast_numeric_table(text, sep, COLS) is None
    with pytest.raises(DataError, match=error.replace("(", r"\(").replace(")", r"\)")):
        sources._read_sep_ratings(f, sep, COLS)


@pytest.mark.parametrize(("rel", "sep"), [("ml-100k/u.data", "\t"), ("ml-1m/ratings_timestamped_subset.dat.gz", "::")])
def test_real_files_read_the_same_both_ways(monkeypatch, rel, sep):
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"{path} not present")
    pd.testing.assert_frame_equal(sources._read_sep_ratings(path, sep, COLS), _careful(monkeypatch, path, sep, COLS))
