"""The dataset downloader (dpn_jax.data.download) against a local HTTP server: resume, retries,
errors without a network, verification, trust on first use, extraction, progress logs."""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpn_jax.data import download
from dpn_jax.data.download import CHECKSUMS, RemoteFile, fetch
from dpn_jax.errors import DataError

BODY = bytes(range(256)) * 400  # 102,400 bytes


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Server:
    """Serves ``files[path]``; ``modes[path]`` changes how: drop (bytes, on the first request),
    stall (bytes, then silence, on the first request), ignore_range, wrong, status, fail_first."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, dict] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


def _handler(state: Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path, rng = self.path, self.headers.get("Range")
            state.requests.append((path, rng))
            nth = len(state.ranges(path))
            mode = state.modes.get(path, {})
            if path not in state.files:
                return self.send_error(404)
            if "status" in mode:
                return self.send_error(mode["status"])
            if mode.get("fail_first") and nth == 1:
                return self.send_error(mode["fail_first"])
            body = state.files[path]
            if mode.get("wrong"):
                body = bytes(reversed(body))
            start = 0
            if rng and not mode.get("ignore_range"):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            data = body[start:]
            for key in ("drop", "stall"):
                if key in mode and (nth == 1 or mode.get("always")):
                    self.wfile.write(data[: mode[key]])
                    self.wfile.flush()
                    if key == "stall":
                        time.sleep(1.5)  # the client's read times out meanwhile
                    return  # the connection closes before Content-Length bytes
            self.wfile.write(data)

    return Handler


@pytest.fixture(autouse=True)
def _fast_and_direct(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    for var in ("no_proxy", "NO_PROXY"):  # 127.0.0.1 never goes through a proxy
        monkeypatch.setenv(var, "*")


@pytest.fixture
def server():
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def run(files, dest, **kw):
    lines: list[str] = []
    kw.setdefault("timeout", 5.0)
    paths = fetch(files, dest, progress=False, log=lines.append, **kw)
    return paths, lines


def test_download_verifies_then_skips_when_present(server, tmp_path):
    server.files["/a.bin"] = BODY
    md5 = hashlib.md5(BODY).hexdigest()
    f = RemoteFile(server.url("/a.bin"), "a.bin", sha256=sha(BODY), md5=md5, size=len(BODY))
    (path,), lines = run([f], tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / "a.bin" and path.read_bytes() == BODY
    assert not path.with_name("a.bin.part").exists() and "a.bin: md5 and sha256 ok" in lines
    (again,), lines = run([f], path.parent)
    assert again == path and len(server.requests) == 1  # no second request
    assert lines == ["a.bin: already present, md5 and sha256 ok"]


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    server.files["/d.bin"] = BODY
    server.modes["/d.bin"] = {"drop": 30_000}
    (path,), lines = run([RemoteFile(server.url("/d.bin"), "d.bin", sha256=sha(BODY))], tmp_path)
    assert path.read_bytes() == BODY
    assert server.ranges("/d.bin") == [None, "bytes=30000-"]
    assert "d.bin: downloaded 0.1 MB" in " ".join(lines)  # both attempts' bytes counted
    assert any("connection closed at byte 30,000" in s and "retry 1/3" in s for s in lines)


def test_stalled_read_times_out_and_resumes(server, tmp_path):
    server.files["/s.bin"] = BODY
    server.modes["/s.bin"] = {"stall": 10_000}
    t0 = time.monotonic()
    (path,), lines = run([RemoteFile(server.url("/s.bin"), "s.bin", size=len(BODY))], tmp_path,
                         timeout=0.3)  # fmt: skip
    assert path.read_bytes() == BODY and time.monotonic() - t0 < 5
    assert server.ranges("/s.bin") == [None, "bytes=10000-"]
    assert any("timed out after 0.3 s" in s for s in lines)


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/i.bin"] = BODY
    server.modes["/i.bin"] = {"drop": 20_000, "ignore_range": True}
    (path,), lines = run([RemoteFile(server.url("/i.bin"), "i.bin", sha256=sha(BODY))], tmp_path)
    assert path.read_bytes() == BODY and server.ranges("/i.bin") == [None, "bytes=20000-"]
    assert any("does not resume (HTTP 200), starting over" in s for s in lines)


def test_part_left_by_an_earlier_run_is_resumed(server, tmp_path):
    server.files["/p.bin"] = BODY
    (tmp_path / "p.bin.part").write_bytes(BODY[:5000])
    (path,), _ = run([RemoteFile(server.url("/p.bin"), "p.bin", sha256=sha(BODY))], tmp_path)
    assert path.read_bytes() == BODY and server.ranges("/p.bin") == ["bytes=5000-"]


def test_416_for_a_complete_part_is_accepted_then_verified(server, tmp_path):
    server.files["/c.bin"] = BODY
    (tmp_path / "c.bin.part").write_bytes(BODY)
    (path,), lines = run([RemoteFile(server.url("/c.bin"), "c.bin", sha256=sha(BODY))], tmp_path)
    assert path.read_bytes() == BODY and server.ranges("/c.bin") == [f"bytes={len(BODY)}-"]
    assert "c.bin: c.bin.part is complete already" in lines and "c.bin: sha256 ok" in lines


def test_transient_http_error_is_retried(server, tmp_path):
    server.files["/t.bin"] = BODY
    server.modes["/t.bin"] = {"fail_first": 503}
    (path,), lines = run([RemoteFile(server.url("/t.bin"), "t.bin")], tmp_path)
    assert path.read_bytes() == BODY and any("HTTP 503" in s for s in lines)


def test_retries_exhausted_names_the_part_to_resume(server, tmp_path):
    server.files["/x.bin"] = BODY
    server.modes["/x.bin"] = {"drop": 0, "always": True}
    with pytest.raises(DataError, match=r"rerun to resume from .*x\.bin\.part") as err:
        run([RemoteFile(server.url("/x.bin"), "x.bin")], tmp_path, retries=2)
    assert len(server.requests) == 3 and "\n" not in str(err.value)
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("status", [404, 403, 401])
def test_http_errors_name_url_and_status(server, tmp_path, status):
    server.files["/h.bin"] = BODY
    server.modes["/h.bin"] = {"status": status}
    with pytest.raises(DataError) as err:
        run([RemoteFile(server.url("/h.bin"), "h.bin")], tmp_path)
    msg = str(err.value)
    assert f"HTTP {status}" in msg and server.url("/h.bin") in msg and "\n" not in msg
    assert str(tmp_path / "h.bin") in msg
    assert ("login" in msg and "Kaggle" in msg) == (status != 404)
    assert len(server.requests) == 1  # not retried


@pytest.mark.parametrize("what", ["sha256", "md5", "size"])
def test_checksum_mismatch_keeps_corrupt_file(server, tmp_path, what):
    server.files["/w.bin"] = BODY
    server.modes["/w.bin"] = {"wrong": True}
    wrong = bytes(reversed(BODY))
    digest = {"sha256": (sha(BODY), sha(wrong)),
              "md5": (hashlib.md5(BODY).hexdigest(), hashlib.md5(wrong).hexdigest())}  # fmt: skip
    kw = {"size": len(BODY) + 1} if what == "size" else {what: digest[what][0]}
    with pytest.raises(DataError) as err:
        run([RemoteFile(server.url("/w.bin"), "w.bin", **kw)], tmp_path)
    msg = str(err.value)
    assert server.url("/w.bin") in msg and f"{what} mismatch" in msg
    if what != "size":
        want, got = digest[what]
        assert f"expected {want}, got {got}" in msg
    assert (tmp_path / "w.bin.corrupt").read_bytes() == wrong
    assert not (tmp_path / "w.bin").exists() and not (tmp_path / "w.bin.part").exists()


def test_connection_refused_says_no_network(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}/f.csv"
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        run([RemoteFile(url, "f.csv")], tmp_path / "d")
    msg = str(err.value)
    assert time.monotonic() - t0 < 3 and "\n" not in msg
    assert url in msg and "127.0.0.1" in msg and "connection refused" in msg
    assert "no network access" in msg
    assert f"place it as {tmp_path / 'd' / 'f.csv'}, then rerun" in msg


def test_dns_failure_and_hanging_resolver(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(download.socket, "getaddrinfo", fail)
    f = RemoteFile("https://data.example.org/criteo.tgz", "criteo.tgz")
    with pytest.raises(DataError, match=r"cannot reach data\.example\.org .*DNS lookup failed.*no "
                                        r"network access"):  # fmt: skip
        run([f], tmp_path)
    release = threading.Event()
    monkeypatch.setattr(download.socket, "getaddrinfo", lambda *a, **k: release.wait(5))
    t0 = time.monotonic()
    with pytest.raises(DataError, match="DNS lookup gave no answer within 0.3 s"):
        run([f], tmp_path, timeout=0.3)
    release.set()
    assert time.monotonic() - t0 < 2


def test_server_that_never_answers_times_out(tmp_path):
    with socket.socket() as s:  # listens (the kernel completes handshakes) but never accepts
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/slow.bin"
        t0 = time.monotonic()
        with pytest.raises(DataError) as err:
            run([RemoteFile(url, "slow.bin")], tmp_path, timeout=0.5, retries=1)
        assert time.monotonic() - t0 < 4
    msg = str(err.value)
    assert url in msg and "no network access" in msg and "timed out after 0.5 s" in msg


def test_trust_on_first_use_records_then_detects_tampering(server, tmp_path):
    server.files["/u.csv"] = BODY
    f = RemoteFile(server.url("/u.csv"), "u.csv")
    (path,), lines = run([f], tmp_path)
    assert (tmp_path / CHECKSUMS).read_text() == f"{sha(BODY)}  u.csv\n"
    assert any("trust on first use" in s and sha(BODY) in s for s in lines)
    _, lines = run([f], tmp_path)
    assert lines == ["u.csv: already present, sha256 ok"] and len(server.requests) == 1
    path.write_bytes(b"tampered")  # detected, set aside and downloaded again
    _, lines = run([f], tmp_path)
    assert any("present but does not verify (sha256 mismatch" in s for s in lines)
    assert path.read_bytes() == BODY and (tmp_path / "u.csv.corrupt").read_bytes() == b"tampered"
    path.write_bytes(b"tampered")  # and the source changed too: the record stands
    server.files["/u.csv"] = b"new upstream bytes"
    want = rf"expected {sha(BODY)} \(recorded in .*{CHECKSUMS}.*got {sha(b'new upstream bytes')}"
    with pytest.raises(DataError, match=rf"{want}.*delete the line for u\.csv"):
        run([f], tmp_path)


def test_file_placed_by_hand_is_trusted_and_recorded(tmp_path):
    (tmp_path / "m.csv").write_bytes(BODY)  # no server needed: nothing is downloaded
    _, lines = run([RemoteFile("http://127.0.0.1:9/m.csv", "m.csv")], tmp_path)
    assert "trust on first use" in lines[0]
    assert f"{sha(BODY)}  m.csv" in (tmp_path / CHECKSUMS).read_text()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["data.zip", "data.tar.gz", "data.tgz", "train.csv.gz"])
def test_extraction_and_rerun_skips_it(server, tmp_path, name):
    members = {"set/train.csv": b"a,b\n1,2\n", "set/test.csv": b"a,b\n3,4\n", "README": b"hi"}
    if name.endswith(".zip"):
        payload = _zip(members)
    elif name.endswith(("tar.gz", ".tgz")):
        payload = _targz(members)
    else:
        payload, members = gzip.compress(b"a,b\n1,2\n" * 1000), {"train.csv": b"a,b\n1,2\n" * 1000}
    server.files["/" + name] = payload
    f = RemoteFile(server.url("/" + name), name, sha256=sha(payload), extract=True)
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "mine.txt").write_text("kept")  # extraction merges into folders
    (path,), lines = run([f], tmp_path)
    assert path.read_bytes() == payload
    for member, data in members.items():
        assert (tmp_path / member).read_bytes() == data
    assert (tmp_path / "set" / "mine.txt").read_text() == "kept"
    assert (tmp_path / f"{name}.extracted").read_text().startswith(sha(payload))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    _, lines = run([f], tmp_path)
    assert lines == [f"{name}: already present, sha256 ok",
                     f"{name}: already extracted ({name}.extracted)"]  # fmt: skip


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("member", ["../evil", "/abs/evil", "sub/../../evil"])
def test_archive_member_escaping_dest_is_refused(server, tmp_path, kind, member):
    payload = (_zip if kind == "zip" else _targz)({"ok.txt": b"fine", member: b"gotcha"})
    name = f"bad.{kind}"
    server.files["/" + name] = payload
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=rf"refusing to extract .*{member}.* outside"):
        run([RemoteFile(server.url("/" + name), name, extract=True)], dest)
    assert not (tmp_path / "evil").exists() and not (dest / "ok.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted([CHECKSUMS, name])  # no half files
    assert not (dest / f"{name}.extracted").exists()


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="needs tarfile's data filter")
def test_tar_link_out_of_dest_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    server.files["/l.tgz"] = buf.getvalue()
    with pytest.raises(DataError, match=r"refusing to extract .*l\.tgz.*passwd"):
        run([RemoteFile(server.url("/l.tgz"), "l.tgz", extract=True)], tmp_path)
    assert not (tmp_path / "passwd").exists() and not (tmp_path / "passwd").is_symlink()


def test_progress_false_logs_at_most_every_tenth(server, tmp_path):
    big = bytes(range(256)) * 4096  # 1 MiB, read in 64 KiB chunks
    server.files["/big.bin"] = big
    _, lines = run([RemoteFile(server.url("/big.bin"), "big.bin")], tmp_path)
    pct = [s for s in lines if s.startswith("big.bin: ") and "% (" in s]
    assert 5 <= len(pct) <= 10 and pct[0].startswith("big.bin: 1")
    assert all("MB/s" in s for s in pct)
    assert any(s.startswith("big.bin: downloaded 1.0 MB") for s in lines)


def test_bad_remote_file_declarations():
    with pytest.raises(DataError, match="not a plain file name"):
        RemoteFile("http://x/y", "../y")
    with pytest.raises(DataError, match="sha256 'abc' is not 64 hex digits"):
        RemoteFile("http://x/y", "y", sha256="abc")
    with pytest.raises(DataError, match="cannot extract 'y.rar'"):
        RemoteFile("http://x/y", "y.rar", extract=True)


def test_data_download_then_prepare_end_to_end(server, tmp_path, monkeypatch, capsys):
    """`dpn-jax data download` (archive unpacked into a sub-folder, published md5 of the csv files
    checked) then `dpn-jax data prepare` on what it fetched; a wrong md5 is refused."""
    import dataclasses

    import numpy as np

    from dpn_jax.cli import main
    from dpn_jax.data import catalog

    rng = np.random.default_rng(0)
    header = "label," + ",".join([f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
    csvs = {}
    for split, n in (("train", 80), ("valid", 20), ("test", 20)):
        rows = [",".join([str(int(rng.random() < 0.3))] + [str(rng.integers(0, 50)) for _ in range(13)]
                         + [f"{rng.integers(0, 6):08x}" for _ in range(26)]) for _ in range(n)]  # fmt: skip
        csvs[f"Criteo_x1/{split}.csv"] = ("\n".join([header, *rows]) + "\n").encode()
    server.files["/Criteo_x1.zip"] = _zip(csvs)
    md5s = tuple((p.split("/")[1], hashlib.md5(b, usedforsecurity=False).hexdigest()) for p, b in csvs.items())
    entry = dataclasses.replace(
        catalog.CATALOG["criteo_x1"], extracted_md5=md5s,
        files=(download.RemoteFile(server.url("/Criteo_x1.zip"), "Criteo_x1.zip", extract=True),))  # fmt: skip
    monkeypatch.setitem(catalog.CATALOG, "criteo_x1", entry)
    data = tmp_path / "data"
    assert main(["data", "download", "criteo_x1", "--to", str(data), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train.csv: md5 ok" in out and "next: dpn-jax data prepare criteo_x1" in out
    assert main(["data", "prepare", "criteo_x1", "--data-dir", str(data), "--cache-dir",
                 str(tmp_path / "cache"), "--no-progress"]) == 0  # fmt: skip
    assert "criteo_x1: 39 fields" in capsys.readouterr().out
    bad = dataclasses.replace(entry, extracted_md5=(("valid.csv", "0" * 32),))
    monkeypatch.setitem(catalog.CATALOG, "criteo_x1", bad)
    assert main(["data", "download", "criteo_x1", "--to", str(data), "--no-progress"]) == 2
    assert "differs from the published" in capsys.readouterr().err
