"""Downloads and extraction, against a local HTTP server on 127.0.0.1 serving archives the
tests build themselves (never the real datasets)."""

import gzip
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port, zip_bytes
from fuxi_mme.config import DataConfig
from fuxi_mme.data import DataError, load_dataset
from fuxi_mme.data.download import Remote, download, fetch, safe_extract

U_DATA = "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{880000000 + 60 * (u * 7 + i)}\n" for u in range(1, 6) for i in range(1, 9))


class Server:
    """Serves ``files`` (path -> bytes) with Range support; can cut a response short."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None  # bytes sent before dropping the connection (once)
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                chunk = body[start:]
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if outer.cut_after is not None:
                    n, outer.cut_after = outer.cut_after, None
                    self.wfile.write(chunk[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.delenv("FUXI_MME_OFFLINE", raising=False)
    s = Server()
    yield s
    s.close()


def _tgz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            t.addfile(info)
    return buf.getvalue()


def test_download_verifies_checksum_and_renames(server, tmp_path):
    body = b"x" * 3_000_000
    server.files["/f.bin"] = body
    out = download(server.url + "/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert out.read_bytes() == body
    assert not (tmp_path / "f.bin.part").exists()


def test_checksum_mismatch_is_refused_and_nothing_is_left(server, tmp_path):
    server.files["/f.bin"] = b"payload"
    with pytest.raises(DataError, match="md5 checksum mismatch"):
        download(server.url + "/f.bin", tmp_path / "f.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    body = bytes(range(256)) * 20_000  # 5 MB
    server.files["/big.bin"] = body
    server.cut_after = 1_500_000
    with pytest.raises(DataError, match="resume"):
        download(server.url + "/big.bin", tmp_path / "big.bin", progress=False)
    part = tmp_path / "big.bin.part"
    assert part.exists() and 0 < part.stat().st_size < len(body)
    assert not (tmp_path / "big.bin").exists()  # an unfinished download never looks complete
    have = part.stat().st_size
    download(server.url + "/big.bin", tmp_path / "big.bin", md5=hashlib.md5(body).hexdigest(), progress=False)
    assert (tmp_path / "big.bin").read_bytes() == body
    assert server.requests[-1][1] == f"bytes={have}-"  # only the missing tail was fetched


def test_offline_message_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FUXI_MME_OFFLINE", raising=False)
    port = free_port()  # a closed port on 127.0.0.1 stands in for "no network"
    with pytest.raises(DataError, match=r"are you offline\?.*put it at .*f\.zip"):
        download(f"http://127.0.0.1:{port}/f.zip", tmp_path / "f.zip", progress=False, timeout=5)


def test_offline_flag_blocks_named_dataset_download(tmp_path):
    cfg = DataConfig(name="ml-100k", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"offline.*raw/ml-100k"):
        load_dataset(cfg)


def test_404_is_a_clear_error(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download(server.url + "/missing.zip", tmp_path / "m.zip", progress=False)


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_path_traversal_is_refused(tmp_path, name):
    arc = tmp_path / "bad.zip"
    arc.write_bytes(zip_bytes({"ok.txt": b"fine", name: b"evil"}))
    with pytest.raises(DataError, match="outside"):
        safe_extract(arc, tmp_path / "out" / "x")
    assert not (tmp_path / "out" / "x").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_tar_symlink_and_traversal_are_refused(tmp_path):
    arc = tmp_path / "bad.tar.gz"
    arc.write_bytes(_tgz({"d/ok.txt": b"ok"}, links={"d/link": "/etc/passwd"}))
    with pytest.raises(DataError, match="link"):
        safe_extract(arc, tmp_path / "out")
    arc.write_bytes(_tgz({"../up.txt": b"evil"}))
    with pytest.raises(DataError, match="outside"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "up.txt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_truncated_archive_is_a_clear_error(tmp_path, kind):
    data = zip_bytes({"ml-100k/u.data": U_DATA.encode() * 50}) if kind == "zip" else _tgz({"ml-100k/u.data": U_DATA.encode() * 50})
    arc = tmp_path / ("a.zip" if kind == "zip" else "a.tar.gz")
    arc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_ml100k_from_a_url_end_to_end(server, tmp_path, capsys):
    from fuxi_mme.cli import main

    archive = zip_bytes({"ml-100k/u.data": U_DATA.encode(), "ml-100k/u.item": "1|Toy Story (1995)|x\n".encode("latin-1")})
    server.files["/ml-100k.zip"] = archive
    rc = main(["data", "prepare", "ml-100k", "--source", server.url + "/ml-100k.zip", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "users 5" in out and "items 8" in out and "interactions 40" in out
    assert "WARNING: ml-100k should have users 943" in out  # fixture counts differ from the published ones
    assert (tmp_path / "raw" / "ml-100k" / "ml-100k" / "ml-100k" / "u.data").exists()
    n = len(server.requests)
    # a second prepare reuses the download and the cache: no new request
    assert main(["data", "info", "ml-100k", "--source", server.url + "/ml-100k.zip", "--data-dir", str(tmp_path)]) == 0
    assert len(server.requests) == n


def test_named_dataset_downloads_official_remotes_with_md5_sidecar(server, tmp_path, monkeypatch):
    from fuxi_mme.data import sources

    archive = zip_bytes({"ml-100k/u.data": U_DATA.encode()})
    server.files["/ml-100k.zip"] = archive
    server.files["/ml-100k.zip.md5"] = (hashlib.md5(archive).hexdigest() + "  ml-100k.zip\n").encode()
    remote = Remote(server.url + "/ml-100k.zip", md5_url=server.url + "/ml-100k.zip.md5")
    monkeypatch.setattr(sources.SOURCES["ml-100k"], "remotes", [remote])
    ds = load_dataset(DataConfig(name="ml-100k", data_dir=str(tmp_path)))
    assert ds.stats["interactions"] == 40
    assert [p for p, _ in server.requests] == ["/ml-100k.zip.md5", "/ml-100k.zip"]
    # a wrong sidecar checksum is refused
    server.files["/ml-100k.zip.md5"] = b"0123456789abcdef0123456789abcdef  ml-100k.zip\n"
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch([remote], tmp_path / "other", progress=False)


def test_local_archive_and_gzipped_file_as_source(tmp_path):
    arc = tmp_path / "ml-100k.tar.gz"
    arc.write_bytes(_tgz({"ml-100k/u.data": U_DATA.encode()}))
    ds = load_dataset(DataConfig(name="ml-100k", path=str(arc), data_dir=str(tmp_path / "c")))
    assert ds.stats["interactions"] == 40
    gz = tmp_path / "ratings.dat.gz"
    gz.write_bytes(gzip.compress(U_DATA.replace("\t", "::").encode()))
    ds = load_dataset(DataConfig(name="ml-1m", path=str(gz), data_dir=str(tmp_path / "c")))
    assert ds.stats["users"] == 5 and ds.has_timestamps
