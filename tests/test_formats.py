"""Every supported raw format on small self-made fixtures, and malformed files with clear errors."""

import gzip

import pandas as pd
import pytest

from fuxi_mme.config import DataConfig
from fuxi_mme.data import DataError, load_dataset


def _rows(users=4, items=6):
    return [(u, i, (u * i) % 5 + 1, 978300000 + 100 * u + 10 * i) for u in range(1, users + 1) for i in range(1, items + 1)]


def _load(name, path, tmp_path, **kw):
    return load_dataset(DataConfig(name=name, path=str(path), data_dir=str(tmp_path / "cache"), **kw))


def test_ml1m_ratings_dat_with_latin1_movies(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in _rows()))
    # the original movies.dat is ISO-8859-1, not UTF-8
    (d / "movies.dat").write_bytes("1::Misérables, Les (1995)::Drama\n2::Toy Story (1995)::Animation\n".encode("latin-1"))
    ds = _load("ml-1m", d, tmp_path)
    assert (ds.stats["users"], ds.stats["items"], ds.stats["interactions"]) == (4, 6, 24)
    assert ds.item_titles[1] == "Misérables, Les (1995)"


def test_ml1m_without_timestamps_disables_the_temporal_channel(tmp_path):
    f = tmp_path / "ratings_notimestamp.dat.gz"
    f.write_bytes(gzip.compress("".join(f"{u}::{i}::{r}\n" for u, i, r, _ in _rows()).encode()))
    ds = _load("ml-1m", f, tmp_path)
    assert not ds.has_timestamps and ds.stats["interactions"] == 24
    assert any("file order" in n for n in ds.stats["notes"])


def test_ml1m_missing_column_is_a_clear_error(tmp_path):
    f = tmp_path / "ratings.dat"
    f.write_text("".join(f"{u}::{i}::{r}\n" for u, i, r, _ in _rows()))
    with pytest.raises(DataError, match=r"line 1 has 3 field\(s\) separated by '::', expected 4"):
        _load("ml-1m", f, tmp_path)


def test_ml100k_wrong_separator_is_a_clear_error(tmp_path):
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.data").write_text("".join(f"{u},{i},{r},{t}\n" for u, i, r, t in _rows()))
    with pytest.raises(DataError, match=r"separated by ',', not '\\t'"):
        _load("ml-100k", d, tmp_path)


def test_ml20m_ratings_csv_and_wrong_separator(tmp_path):
    d = tmp_path / "ml-20m"
    d.mkdir()
    pd.DataFrame(_rows(), columns=["userId", "movieId", "rating", "timestamp"]).to_csv(d / "ratings.csv", index=False)
    pd.DataFrame({"movieId": [1], "title": ["Jumanji (1995)"], "genres": ["x"]}).to_csv(d / "movies.csv", index=False)
    ds = _load("ml-20m", d, tmp_path)
    assert ds.stats["interactions"] == 24 and ds.item_titles[1] == "Jumanji (1995)"
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame(_rows(), columns=["userId", "movieId", "rating", "timestamp"]).to_csv(bad / "ratings.csv", index=False, sep=";")
    with pytest.raises(DataError, match=r"no column 'userId'.*separator"):
        _load("ml-20m", bad, tmp_path)


def test_duplicate_rows_are_refused_by_default_and_can_be_dropped(tmp_path):
    rows = _rows()
    f = tmp_path / "ratings.dat"
    f.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows + rows[:3]))
    with pytest.raises(DataError, match=r"3 row\(s\) repeat.*data row 25.*data.duplicates=drop"):
        _load("ml-1m", f, tmp_path)
    ds = _load("ml-1m", f, tmp_path, duplicates="drop")
    assert ds.stats["interactions"] == 24
    assert _load("ml-1m", f, tmp_path, duplicates="keep").stats["interactions"] == 27


def test_kuairand_standard_logs(tmp_path):
    d = tmp_path / "KuaiRand-Pure" / "data"
    d.mkdir(parents=True)
    cols = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "play_time_ms"]
    first = [(u, 100 + i, 20220408, 1200, 1649390000000 + 1000 * (u * 10 + i) + 3, 1, 500) for u in range(6) for i in range(6)]
    second = [(u, 200 + i, 20220422, 1200, 1650600000000 + 999 * i, 0, 0) for u in range(6) for i in range(2)]
    pd.DataFrame(first, columns=cols).to_csv(d / "log_standard_4_08_to_4_21_pure.csv", index=False)
    pd.DataFrame(second, columns=cols).to_csv(d / "log_standard_4_22_to_5_08_pure.csv", index=False)
    # a one-off user below the 5-interaction filter, and the random log, which is ignored
    pd.DataFrame([(99, 1, 0, 0, 1649390000000, 1, 1)], columns=cols).to_csv(d / "log_random_4_22_to_5_08_pure.csv", index=False)
    ds = _load("kuairand-pure", tmp_path / "KuaiRand-Pure", tmp_path)
    assert ds.stats["users"] == 6 and ds.stats["interactions"] == 48 and ds.has_timestamps
    seq = ds.items[ds.offsets[0] : ds.offsets[1]]
    raw = ds.item_raw[seq]
    assert list(raw) == [100, 101, 102, 103, 104, 105, 200, 201]  # time_ms order across files
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame(first, columns=["uid"] + cols[1:]).to_csv(bad / "log_standard_4_08_to_4_21_pure.csv", index=False)
    with pytest.raises(DataError, match="lacks column.*user_id"):
        _load("kuairand-pure", bad, tmp_path)


def test_amazon_raw_ratings_csv_with_5core(tmp_path):
    rows = []
    for u in range(8):
        for i in range(6):
            rows.append((f"U{u}", f"B00{i}", 5.0, 1300000000 + 86400 * (u + i)))
    rows.append(("LONELY", "B00RARE", 4.0, 1300000000))  # removed by the 5-core filter
    f = tmp_path / "ratings_Beauty.csv"
    pd.DataFrame(rows).to_csv(f, index=False, header=False)
    ds = _load("amazon-beauty", f, tmp_path)
    assert (ds.stats["users"], ds.stats["items"], ds.stats["interactions"]) == (8, 6, 48)
    assert ds.has_timestamps
    assert any("5-core" in n for n in ds.stats["notes"])
    # any other category by name, through the same reader
    ds = _load("amazon-electronics", f, tmp_path)
    assert ds.stats["interactions"] == 48


def test_amazon_ratings_wrong_column_count(tmp_path):
    f = tmp_path / "ratings_Beauty.csv"
    f.write_text("A,B,5.0\nA,C,4.0\n")
    with pytest.raises(DataError, match="3 column.*expected 4"):
        _load("amazon-beauty", f, tmp_path)


def test_s3rec_and_sasrec_sequence_files_agree(tmp_path):
    seqs = {1: [5, 3, 9, 2, 7], 2: [3, 3, 8, 1, 4, 6], 3: [2, 9, 7, 5, 1]}
    s3 = tmp_path / "s3" / "Beauty.txt"
    s3.parent.mkdir()
    s3.write_text("".join(f"{u} " + " ".join(map(str, v)) + "\n" for u, v in seqs.items()))
    sas = tmp_path / "sas" / "Beauty.txt"
    sas.parent.mkdir()
    sas.write_text("".join(f"{u} {i}\n" for u, v in seqs.items() for i in v))
    a = _load("amazon-beauty", s3, tmp_path)
    b = _load("amazon-beauty", sas, tmp_path)
    assert not a.has_timestamps and not b.has_timestamps
    assert (a.items == b.items).all() and (a.offsets == b.offsets).all()
    assert list(a.item_raw[a.items[a.offsets[1] : a.offsets[2]]]) == [3, 3, 8, 1, 4, 6]  # repeats kept, order kept


def test_sequence_file_malformed(tmp_path):
    f = tmp_path / "Beauty.txt"
    f.write_text("1,2,3,4\n")
    with pytest.raises(DataError, match="commas"):
        _load("amazon-beauty", f, tmp_path)
    f.write_text("1 2 3\n7\n")
    with pytest.raises(DataError, match="line 2 has a user but no items"):
        _load("amazon-beauty", f, tmp_path)
    f.write_bytes(b"1 \xff\xfe 3\n")
    with pytest.raises(DataError, match="not utf-8"):
        _load("amazon-beauty", f, tmp_path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    f = tmp_path / "ratings.dat.gz"
    data = gzip.compress("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in _rows(50, 50)).encode())
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        _load("ml-1m", f, tmp_path)


def test_generic_file_with_timestamps_and_without(tmp_path):
    f = tmp_path / "log.csv"
    pd.DataFrame(_rows(), columns=["uid", "sku", "stars", "ts"]).to_csv(f, index=False)
    ds = load_dataset(DataConfig(name="file", path=str(f), user_col="uid", item_col="sku", time_col="ts", data_dir=str(tmp_path / "c")))
    assert ds.has_timestamps and ds.stats["interactions"] == 24
    ds = load_dataset(DataConfig(name="file", path=str(f), user_col="uid", item_col="sku", time_col=None, data_dir=str(tmp_path / "c")))
    assert not ds.has_timestamps


def test_hstu_ordering_differs_only_among_ties(tmp_path):
    # many ties: HSTU's unstable sort may permute them; stable keeps file order
    rows = [(1, i, 5, 1000 + (i // 10)) for i in range(1, 200)]
    f = tmp_path / "ratings.dat"
    f.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    stable = _load("ml-1m", f, tmp_path)
    hstu = _load("ml-1m", f, tmp_path, ordering="hstu")
    assert list(stable.item_raw[stable.items]) == [r[1] for r in rows]
    assert sorted(hstu.items.tolist()) == sorted(stable.items.tolist())
    assert (hstu.timestamps == stable.timestamps).all()  # the time order itself is the same


def test_a_dataset_prepared_from_a_source_is_found_later_without_it(tmp_path, monkeypatch):
    """``data prepare ml-1m --source DIR``, then ``data info ml-1m`` / ``train --dataset ml-1m``
    with no ``--source``: the prepared copy is used, nothing is downloaded."""
    import fuxi_mme.data as data

    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in _rows()))
    first = _load("ml-1m", d, tmp_path)
    monkeypatch.setattr(data, "fetch", lambda *a, **k: pytest.fail("downloaded although the dataset was prepared from --source"))
    again = load_dataset(DataConfig(name="ml-1m", data_dir=str(tmp_path / "cache")))
    assert again.cache_dir == first.cache_dir and again.stats["interactions"] == 24
