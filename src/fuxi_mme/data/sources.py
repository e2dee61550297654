"""Named datasets and how each is read into the canonical table.

Each :class:`Source` knows where its files come from (official download locations), how to
parse them, whether they carry timestamps, and the statistics published for it (a mismatch
after preparation is a loud warning naming the expected numbers). ``file`` is the generic
loader for user files. ``docs/datasets.md`` documents every dataset and its preprocessing.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import demo
from .amazon import read_amazon_ratings, read_sequence_file
from .download import Remote
from .formats import detect
from .readers import read as read_layout
from .table import DataError, canonicalize, open_text, read_bytes, read_table_file

log = logging.getLogger(__name__)


@dataclass
class Source:
    name: str
    description: str
    read: Callable[[Path | None, Any], tuple[pd.DataFrame, dict[Any, str] | None]]
    has_timestamps: bool = True  # a reader may override per file via df.attrs["has_timestamps"]
    needs_files: bool = True
    expected: dict[str, int] = field(default_factory=dict)  # users/items/interactions
    files_hint: str = ""
    licence: str = ""
    remotes: list[Remote] = field(default_factory=list)  # official download locations
    duplicates: str = "error"  # default policy for exact duplicate (user, item, timestamp) rows
    min_user_interactions: int | None = None  # the published preprocessing's user filter, if any


def _decode_titles(path: Path) -> str:
    """MovieLens metadata is ISO-8859-1 in the original archives; UTF-8 copies exist too."""
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # never fails; the original encoding of movies.dat / u.item


def _find(folder: Path, names: list[str], what: str) -> Path:
    if folder.is_file():
        return folder
    for n in names:
        if (folder / n).is_file():
            return folder / n
        # an extracted archive's sub-folders (skipping partial downloads in dot-folders)
        hits = sorted(
            (h for h in folder.rglob(n) if not any(x.startswith(".") for x in h.relative_to(folder).parts)), key=lambda h: (len(h.parts), str(h))
        )
        if hits:
            return hits[0]
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) if folder.is_dir() else "nothing"
    raise DataError(
        f"{folder} holds none of {', '.join(names)} ({what}); it has {present or 'no files'}. Point --source at the dataset's files or archive"
    )


def _fast_numeric_table(text: str, sep: str, cols: list[str]) -> pd.DataFrame | None:
    """``text`` as a table of ``len(cols)`` integer columns by pandas' C parser, or None where
    any line is not exactly that (a wrong field count, a non-integer, a quote, a blank-looking
    line): the careful reader then finds the line and names the problem. The same frame as the
    careful reader's where both succeed (tested); 0.3 s instead of 2.1 s for ML-1M's 1M lines."""
    if "\r" in text.replace("\r\n", ""):  # a lone carriage return: no line end to the careful reader
        return None
    if len(sep) > 1:
        if "\t" in text:
            return None
        text, sep = text.replace(sep, "\t"), "\t"
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, header=None, index_col=False, engine="c", quoting=csv.QUOTE_NONE, skip_blank_lines=True)
    except (ValueError, pd.errors.ParserError):
        return None
    # integers only: a float's last bit may differ between parsers (and pandas versions)
    # the first line sets the field count; a longer line later fails the parse, a shorter one
    # leaves a gap (a float column)
    if df.shape[1] != len(cols) or any(not pd.api.types.is_integer_dtype(df[c]) for c in df.columns):
        return None
    df.columns = cols
    if len(df) != sum(1 for line in text.splitlines() if line.strip()):
        return None
    return df


def _read_sep_ratings(path: Path, sep: str, cols: list[str]) -> pd.DataFrame:
    text = open_text(path, "latin-1").read()
    fast = _fast_numeric_table(text, sep, cols)
    if fast is not None:
        return fast
    rows = [line.rstrip("\r\n").split(sep) for line in io.StringIO(text) if line.strip()]
    if not rows:
        layout = sep.join(cols).replace("\t", " TAB ")
        raise DataError(f"{path} is empty; expected one rating per line, {layout}: point --source at the dataset's original file")
    bad = [i for i, r in enumerate(rows) if len(r) != len(cols)]
    if bad:
        got = len(rows[bad[0]])
        hint = "is this the right file and separator?"
        if got == 1:
            other = next((c for c in ("\t", "::", ",", ";", "|", " ") if c != sep and c in rows[bad[0]][0]), None)
            if other:
                hint = f"the line is separated by {other!r}, not {sep!r}: this is not the original file format"
        raise DataError(f"{path}: line {bad[0] + 1} has {got} field(s) separated by {sep!r}, expected {len(cols)} ({', '.join(cols)}); {hint}")
    df = pd.DataFrame(rows, columns=cols)
    for c in cols:
        num = pd.to_numeric(df[c], errors="coerce")
        if num.isna().any():
            i = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise DataError(f"{path}: line {i + 1}, field {c!r} is not a number ({df[c].iloc[i]!r})")
        df[c] = num
    return df


def _movie_titles(path: Path | None, sep: str) -> dict[Any, str] | None:
    if path is None or not path.is_file():
        return None
    titles = {}
    for line in _decode_titles(path).splitlines():
        parts = line.split(sep)
        if len(parts) >= 2 and parts[0].strip().isdigit():
            titles[int(parts[0])] = parts[1]
    return titles


def _read_ml100k(path: Path | None, cfg: Any):
    assert path is not None
    f = _find(path, ["u.data"], "MovieLens-100K ratings")
    df = _read_sep_ratings(f, "\t", ["user", "item", "rating", "timestamp"])
    return canonicalize(df, str(f), rating_col="rating", header_lines=0), _movie_titles(f.parent / "u.item", "|")


_ML1M_NAMES = ("ratings.dat", "ratings.dat.gz")
_ML1M_NO_TS = ("ratings_notimestamp.dat.gz", "ratings_notimestamp.dat")


def _read_ml1m(path: Path | None, cfg: Any, names=_ML1M_NAMES + _ML1M_NO_TS):
    """``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), plain, gzipped or in the archive.

    ``ratings_notimestamp.dat[.gz]`` (``UserID::MovieID::Rating``, as in ../shared/data) is
    accepted too: every rating, file order, no timestamps (so not the published chronological
    order; a note says so).
    """
    assert path is not None
    f = _find(path, list(names), "MovieLens-1M ratings")
    no_ts = "notimestamp" in f.name
    cols = ["user", "item", "rating"] + ([] if no_ts else ["timestamp"])
    df = _read_sep_ratings(f, "::", cols)
    out = canonicalize(df, str(f), time_col=None if no_ts else "timestamp", rating_col="rating", header_lines=0)
    if no_ts:
        out.attrs["has_timestamps"] = False
        out.attrs["notes"] = [
            f"{f.name} has no timestamps: sequences follow file order, which is not the chronological order the "
            "published ML-1M numbers use; the temporal channel is disabled"
        ]
    return out, _movie_titles(f.parent / "movies.dat", "::")


def _read_ml1m_ts70(path: Path | None, cfg: Any):
    return _read_ml1m(path, cfg, names=("ratings_timestamped_subset.dat.gz", "ratings_timestamped_subset.dat"))


def _read_ml20m(path: Path | None, cfg: Any):
    assert path is not None
    f = _find(path, ["ratings.csv", "ratings.csv.gz"], "MovieLens-20M ratings")
    df = read_table_file(f, sep=",")
    df = canonicalize(df, str(f), "userId", "movieId", "timestamp", "rating")
    titles = None
    movies = f.parent / "movies.csv"
    if movies.is_file():
        m = pd.read_csv(io.StringIO(_decode_titles(movies)))
        titles = dict(zip(m["movieId"].tolist(), m["title"].tolist()))
    return df, titles


# --------------------------------------------------------------------------- KuaiRand


def _read_kuairand(variant: str):
    """The standard-policy logs (both periods) of KuaiRand-Pure or KuaiRand-1K.

    Every logged exposure is an interaction (FuXi-alpha/HSTU treat the log as the sequence),
    ordered by ``time_ms``; the random-exposure log is left out because it is an intervention,
    not the user's own feed. Timestamps become seconds after the millisecond order is fixed.
    """

    def read(path: Path | None, cfg: Any):
        assert path is not None
        pattern = f"log_standard_*_{variant}.csv"
        files = [path] if path.is_file() else sorted(path.rglob(pattern))
        if not files:
            raise DataError(
                f"{path} holds no {pattern} files (KuaiRand-{variant.capitalize() if variant == 'pure' else '1K'} "
                "standard logs); point --source at the extracted KuaiRand folder or its archive"
            )
        parts = []
        for f in files:
            t = read_table_file(f, sep=",")
            missing = [c for c in ("user_id", "video_id", "time_ms") if c not in t.columns]
            if missing:
                raise DataError(
                    f"{f} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, t.columns[:8]))}); is this a KuaiRand log_standard file?"
                )
            part = canonicalize(t, str(f), "user_id", "video_id", "time_ms")
            if getattr(cfg, "behavior", None) == "auto":
                part["behavior"] = kuairand_behavior(t)
            parts.append(part)
        df = pd.concat(parts, ignore_index=True)
        order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user"].to_numpy()))
        df = df.iloc[order].reset_index(drop=True)
        df["timestamp"] = df["timestamp"] // 1000  # ms -> s, after the ms order is fixed
        return df, None

    return read


KUAIRAND_FLAGS = (
    ("is_like", "like"),
    ("is_follow", "follow"),
    ("is_comment", "comment"),
    ("is_forward", "forward"),
    ("long_view", "long_view"),
    ("is_click", "click"),
)


def kuairand_behavior(t: pd.DataFrame) -> np.ndarray:
    """KuaiRand's feedback flags folded into one behaviour per exposure: the first flag set in
    the order like, follow, comment, forward, long_view, click; ``view`` when none is (a flag
    column the file lacks counts as unset)."""
    out = np.full(len(t), "view", dtype=object)
    for col, name in reversed(KUAIRAND_FLAGS):  # the strongest flag is written last
        if col in t.columns:
            out[pd.to_numeric(t[col], errors="coerce").fillna(0).to_numpy() > 0] = name
    return out


# --------------------------------------------------------------------------- Amazon


def _amazon(category_file: str):
    ratings_name = "ratings_" + category_file.replace(".txt", ".csv")

    def read(path: Path | None, cfg: Any):
        assert path is not None
        f = _find(path, [category_file, category_file + ".gz", ratings_name, ratings_name + ".gz"], "Amazon 5-core sequences or raw ratings CSV")
        if f.name.startswith("ratings_") or ".csv" in f.name:
            return read_amazon_ratings(f), None
        return read_sequence_file(f), None

    return read


def _amazon_generic(category: str) -> Source:
    """``amazon-<category>`` for any category: the raw ratings CSV (5-core) or a sequence file."""

    def read(path: Path | None, cfg: Any):
        assert path is not None
        if path.is_dir():
            cands = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if len(cands) != 1:
                raise DataError(f"{path} should hold one ratings CSV or sequence file for amazon-{category}; pass the file itself with --source")
            path = cands[0]
        if ".csv" in path.name:
            return read_amazon_ratings(path), None
        return read_sequence_file(path), None

    cat = _AMAZON_2014.get(category)
    remotes = [Remote(f"{_SNAP}/ratings_{cat}.csv")] if cat else []
    return Source(
        f"amazon-{category}",
        f"Amazon {cat or category} ratings, 5-core (or a preprocessed sequence file)",
        read,
        files_hint=f"ratings_{cat or '<Category>'}.csv (raw ratings) or a sequence file",
        licence=_AMAZON_LICENCE,
        remotes=remotes,
    )


def _read_demo(path: Path | None, cfg: Any):
    cat = demo.item_catalogue()
    return demo.generate(cfg.demo_users, cfg.demo_seed), dict(zip(cat["item"].tolist(), cat["title"].tolist()))


def _read_file(path: Path | None, cfg: Any):
    """A user's own file in any layout :mod:`~fuxi_mme.data.formats` recognises (tables with or
    without a header, S3-Rec sequences, SASRec pairs, MovieLens ``::``, OTTO sessions; gzip, zip,
    Parquet folders), detected from its content unless ``data.format`` names one."""
    if path is None:
        raise DataError("dataset 'file' needs a file: pass --source FILE (a table, sequence, pairs, MovieLens or sessions file)")
    det = detect(path)
    if cfg.format != "auto":
        det = replace(det, format=cfg.format, reason=f"data.format={cfg.format} (detection found {det.format}: {det.reason})")
    df = read_layout(
        path, det, user_col=cfg.user_col, item_col=cfg.item_col, time_col=cfg.time_col, rating_col=cfg.rating_col, sep=cfg.sep, header=cfg.header
    )
    if cfg.time_col is None:
        df.attrs["has_timestamps"] = False
    return df, None


_ML_LICENCE = "GroupLens research licence: no redistribution; download it yourself"
_AMAZON_LICENCE = "Amazon review data (McAuley et al.): research use, no redistribution"
_KUAI_LICENCE = "CC BY-SA 4.0 (KuaiRand, Gao et al., CIKM 2022)"
_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_SNAP = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
_S3REC = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data"
_ZENODO = "https://zenodo.org/records/10439422/files"
_AMAZON_2014 = {"beauty": "Beauty", "sports": "Sports_and_Outdoors", "toys": "Toys_and_Games", "books": "Books"}


def _amazon_5core(name: str, category: str, users: int, items: int, interactions: int) -> Source:
    """``amazon-<name>``: the S3-Rec 5-core sequences of ``category`` (order only) or its raw ratings CSV."""
    return Source(
        f"amazon-{name}",
        f"Amazon {category} 5-core: S3-Rec sequences (order only) or the raw ratings CSV",
        _amazon(f"{category}.txt"),
        has_timestamps=False,
        expected={"users": users, "items": items, "interactions": interactions},
        files_hint=f"a folder with {category}.txt or ratings_{category}.csv",
        licence=_AMAZON_LICENCE,
        remotes=[Remote(f"{_S3REC}/{category}.txt")],
    )


def _grouplens(name: str) -> list[Remote]:
    return [Remote(f"{_GROUPLENS}/{name}.zip", md5_url=f"{_GROUPLENS}/{name}.zip.md5")]


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "demo",
            "built-in synthetic log (facets, order and time gaps carry signal)",
            _read_demo,
            needs_files=False,
            licence="generated; ours (MIT)",
        ),
        Source(
            "file",
            "your own interactions file, layout detected (tables, S3-Rec sequences, SASRec pairs, MovieLens ::, OTTO sessions; --source)",
            _read_file,
        ),
        Source(
            "ml-100k",
            "MovieLens-100K (u.data)",
            _read_ml100k,
            expected={"users": 943, "items": 1682, "interactions": 100000},
            files_hint="the extracted ml-100k folder (u.data, u.item) or ml-100k.zip",
            licence=_ML_LICENCE,
            remotes=_grouplens("ml-100k"),
        ),
        Source(
            "ml-1m",
            "MovieLens-1M (ratings.dat)",
            _read_ml1m,
            expected={"users": 6040, "items": 3706, "interactions": 1000209},
            files_hint="the extracted ml-1m folder (ratings.dat, movies.dat) or ml-1m.zip",
            licence=_ML_LICENCE,
            remotes=_grouplens("ml-1m"),
        ),
        Source(
            "ml-1m-ts70",
            "MovieLens-1M, the 70% of ratings with known timestamps (not the published ML-1M)",
            _read_ml1m_ts70,
            expected={"users": 6040, "interactions": 699929},
            files_hint="a folder with ratings_timestamped_subset.dat.gz (../shared/data/ml-1m)",
            licence=_ML_LICENCE,
        ),
        Source(
            "ml-20m",
            "MovieLens-20M (ratings.csv)",
            _read_ml20m,
            expected={"users": 138493, "items": 26744, "interactions": 20000263},
            files_hint="the extracted ml-20m folder (ratings.csv, movies.csv) or ml-20m.zip",
            licence=_ML_LICENCE,
            remotes=_grouplens("ml-20m"),
        ),
        Source(
            "kuairand-pure",
            "KuaiRand-Pure standard logs (user_id, video_id, time_ms)",
            _read_kuairand("pure"),
            expected={"users": 25634, "items": 7550, "interactions": 6945823},
            files_hint="the extracted KuaiRand-Pure folder (data/log_standard_*_pure.csv) or KuaiRand-Pure.tar.gz",
            licence=_KUAI_LICENCE,
            remotes=[Remote(f"{_ZENODO}/KuaiRand-Pure.tar.gz")],
            duplicates="drop",
            min_user_interactions=5,
        ),
        Source(
            "kuairand-1k",
            "KuaiRand-1K standard logs (user_id, video_id, time_ms)",
            _read_kuairand("1k"),
            files_hint="the extracted KuaiRand-1K folder (data/log_standard_*_1k.csv) or KuaiRand-1K.tar.gz",
            licence=_KUAI_LICENCE,
            remotes=[Remote(f"{_ZENODO}/KuaiRand-1K.tar.gz")],
            duplicates="drop",
            min_user_interactions=5,
        ),
        _amazon_5core("beauty", "Beauty", 22363, 12101, 198502),
        _amazon_5core("sports", "Sports_and_Outdoors", 35598, 18357, 296337),
        _amazon_5core("toys", "Toys_and_Games", 19412, 11924, 167597),
        _amazon_generic("books"),
    ]
}

_AMAZON_NAME = re.compile(r"^amazon-[a-z0-9_]+$")


def is_own_data(name: str) -> bool:
    """A user's own data: the generic ``file`` or any name that is not a named dataset (the
    data's own name, e.g. its file's stem)."""
    return name == "file" or (name not in SOURCES and not _AMAZON_NAME.match(name))


def own_data_name(path: str | Path) -> str:
    """The name own data is known by when ``--name`` is not given: its file's (or folder's) stem,
    lower-case, without compression and format suffixes; ``file-<stem>`` where that is a named
    dataset's name (``ml-1m.csv`` is not the MovieLens-1M reader's input) or the generic ``file``."""
    stem = Path(str(path).rstrip("/\\")).name.lower()
    for _ in range(3):
        base, dot, ext = stem.rpartition(".")
        if dot and base and ext in ("gz", "zip", "csv", "tsv", "txt", "dat", "parquet", "pq", "jsonl", "json", "ndjson", "inter"):
            stem = base
    stem = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-.") or "data"
    return stem if is_own_data(stem) and stem != "file" else f"file-{stem}"  # "file" is the generic name with a fixed shape


def get_source(name: str) -> Source:
    if name in SOURCES:
        return SOURCES[name]
    if _AMAZON_NAME.match(name):  # any other Amazon category, from its raw ratings CSV
        return _amazon_generic(name[len("amazon-") :])
    return SOURCES["file"]  # own data under its own name
