"""Files and folders written through a temporary and renamed get the permissions a plainly
created one gets (the umask's), not tempfile's owner-only ones: a report, results file or
export is readable by whoever can read its folder."""

import os
import stat

import pandas as pd

from fuxi_mme.serve.batch import write_table
from fuxi_mme.utils.runinfo import UMASK, atomic_write_text


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomically_written_files_get_the_umask_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    write_table(pd.DataFrame({"user": [1], "item": [2]}), tmp_path / "recs.csv")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = 0o666 & ~UMASK
    assert _mode(plain) == want  # what open() gives under this umask
    assert _mode(tmp_path / "a.json") == want and _mode(tmp_path / "recs.csv") == want


def test_a_prepared_cache_folder_gets_the_umask_permissions(tmp_path):
    from fuxi_mme.config import DataConfig
    from fuxi_mme.data import load_dataset

    ds = load_dataset(DataConfig(name="demo", demo_users=60, data_dir=str(tmp_path)))
    assert _mode(ds.cache_dir) == 0o777 & ~UMASK


def test_temporary_folders_renamed_into_place_get_the_umask_permissions(tmp_path):
    """temp_dir_beside is what the prepared cache, the columnar engine, archive extraction and
    checkpoints make their folders with: beside the target, not owner-only."""
    from fuxi_mme.utils.runinfo import temp_dir_beside

    tmp = temp_dir_beside(tmp_path / "deep" / "target", "extract")
    assert tmp.parent == tmp_path / "deep" and tmp.name.startswith(".target.extract-")
    assert _mode(tmp) == 0o777 & ~UMASK
