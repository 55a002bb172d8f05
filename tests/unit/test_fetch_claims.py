"""Claims about getting a data file into place (pipeline.data.fetch): the checksum is hashlib's,
the mirror is tried first and its file copied byte for byte, a download (here a local file:// URL:
urllib opens it without any network) is verified the same way, a wrong checksum names both digests
and leaves nothing behind, and the mirror folder comes from $DATA_MIRROR or the param."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

import pytest

from pipeline import progress
from pipeline.data import fetch as fetch_module
from pipeline.data.fetch import fetch, file_digest, mirror_dir
from pipeline.errors import DataError

PAYLOAD = b"date,OT\n2016-07-01 00:00:00,1.5\n" * 7 + b"tail"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def bars(monkeypatch):
    """Records every progress bar fetch opens (the real bar still runs) and what it was told."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)   # a disabled bar counts nothing
    made = []
    real = progress.bar

    def spy(total, desc, *args, **kwargs):
        shown = real(total, desc, *args, **kwargs)
        made.append({"total": total, "desc": desc, "args": args, "kwargs": kwargs, "bar": shown})
        return shown

    monkeypatch.setattr(progress, "bar", spy)
    return made


# ---------------------------------------------------------------- file_digest, mirror_dir

@pytest.mark.parametrize("algorithm", ["sha256", "md5", "sha1"])
def test_file_digest_is_hashlibs_digest_of_the_whole_file(tmp_path, algorithm):
    data = bytes(range(256)) * 5000 + b"end"   # > 1 MiB: read in more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f", algorithm) == hashlib.new(algorithm, data).hexdigest()


def test_file_digest_defaults_to_sha256(tmp_path):
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert file_digest(tmp_path / "f") == _sha256(PAYLOAD)


def test_mirror_dir_is_the_env_variable_first_then_the_param_then_none(monkeypatch, tmp_path):
    monkeypatch.delenv("DATA_MIRROR", raising=False)
    assert mirror_dir("") is None
    assert mirror_dir(str(tmp_path / "param")) == tmp_path / "param"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mirror_dir("~/data") == tmp_path / "home" / "data"        # `~` is expanded
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "env"))
    assert mirror_dir(str(tmp_path / "param")) == tmp_path / "env"   # the variable wins over the param
    assert mirror_dir("") == tmp_path / "env"
    monkeypatch.setenv("DATA_MIRROR", "~/m")
    assert mirror_dir("") == tmp_path / "home" / "m"
    monkeypatch.setenv("DATA_MIRROR", "")                            # set but empty: the param
    assert mirror_dir(str(tmp_path / "param")) == tmp_path / "param"
    assert mirror_dir("") is None


# ---------------------------------------------------------------- from a mirror

def test_a_mirror_file_is_copied_byte_for_byte_after_its_checksum_matched(tmp_path, bars):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ETTh1.csv").write_bytes(PAYLOAD)
    dest = tmp_path / "data" / "raw" / "ETTh1.csv"   # folders that do not exist yet are made
    assert fetch(dest, "file:///nonexistent/never-read", _sha256(PAYLOAD), "sha256", mirror) == "mirror"
    assert dest.read_bytes() == PAYLOAD
    assert _files(dest.parent) == ["ETTh1.csv"]        # no .partial left
    assert (mirror / "ETTh1.csv").read_bytes() == PAYLOAD   # the mirror's file stays
    # The copy shows the file name, where it comes from and its size in bytes.
    (made,) = bars
    assert made["total"] == len(PAYLOAD) and made["desc"] == "ETTh1.csv (mirror)"
    assert made["kwargs"]["unit"] == "B" and made["bar"].n == len(PAYLOAD)


def test_the_mirror_is_checked_with_the_given_algorithm(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "x.npz").write_bytes(PAYLOAD)
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    assert fetch(tmp_path / "out" / "x.npz", "file:///nonexistent", md5, "md5", mirror) == "mirror"
    assert (tmp_path / "out" / "x.npz").read_bytes() == PAYLOAD
    with pytest.raises(DataError, match=f"sha256 is {_sha256(PAYLOAD)}, expected {md5}"):
        fetch(tmp_path / "out2" / "x.npz", "file:///nonexistent", md5, "sha256", mirror)


def test_a_wrong_mirror_checksum_names_both_digests_and_keeps_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ETTh1.csv").write_bytes(PAYLOAD[:-3])   # truncated
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        fetch(out / "ETTh1.csv", "file:///nonexistent", _sha256(PAYLOAD), "sha256", mirror, "fix the mirror")
    message = str(caught.value)
    assert f"mirror file {mirror / 'ETTh1.csv'}: sha256 is {_sha256(PAYLOAD[:-3])}, expected {_sha256(PAYLOAD)}" \
        in message
    assert "Nothing was kept" in message and message.endswith("Ways out: fix the mirror")
    assert _files(out) == []   # neither the file nor its .partial


def test_a_wrong_checksum_does_not_replace_a_file_already_in_place(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.csv").write_bytes(b"corrupt")
    (tmp_path / "a.csv").write_bytes(b"old good file")
    with pytest.raises(DataError):
        fetch(tmp_path / "a.csv", "file:///nonexistent", _sha256(b"good"), "sha256", mirror)
    assert (tmp_path / "a.csv").read_bytes() == b"old good file"
    assert not (tmp_path / "a.csv.partial").exists()


def test_no_expected_checksum_accepts_the_file_as_it_is(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "u.csv").write_bytes(b"unpinned")
    assert fetch(tmp_path / "u.csv", "file:///nonexistent", "", "sha256", mirror) == "mirror"
    assert (tmp_path / "u.csv").read_bytes() == b"unpinned"


# ---------------------------------------------------------------- from the URL

def test_without_a_mirror_file_the_url_is_fetched_and_verified(tmp_path, bars, monkeypatch):
    source = tmp_path / "remote" / "served.csv"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    opened = []
    real_urlopen = urllib.request.urlopen

    def urlopen(url, *args, **kwargs):
        opened.append((url, args, kwargs))
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    dest = tmp_path / "raw" / "ETTh1.csv"
    assert fetch(dest, source.as_uri(), _sha256(PAYLOAD), "sha256", empty_mirror) == "download"
    assert dest.read_bytes() == PAYLOAD and _files(dest.parent) == ["ETTh1.csv"]
    assert opened == [(source.as_uri(), (), {"timeout": 15})]   # gives up on a silent server after 15 s
    # The bar knows the size from Content-Length and is named after the file.
    (made,) = bars
    assert made["total"] == len(PAYLOAD) and made["desc"] == "ETTh1.csv" and made["bar"].n == len(PAYLOAD)
    # No mirror at all: straight to the URL.
    assert fetch(tmp_path / "b" / "ETTh1.csv", source.as_uri(), _sha256(PAYLOAD)) == "download"
    assert (tmp_path / "b" / "ETTh1.csv").read_bytes() == PAYLOAD


def _download_with_headers(tmp_path, monkeypatch, edit) -> str:
    """fetch() of a local file:// URL whose response headers `edit` changes first."""
    source = tmp_path / "served.bin"
    source.write_bytes(PAYLOAD)
    real_urlopen = urllib.request.urlopen

    def urlopen(url, *args, **kwargs):
        response = real_urlopen(url, *args, **kwargs)
        edit(response.headers)
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return fetch(tmp_path / "o.bin", source.as_uri(), _sha256(PAYLOAD))


def test_a_download_without_content_length_shows_an_open_ended_bar(tmp_path, bars, monkeypatch):
    def drop_length(headers):
        for name in ("Content-length", "Content-Length"):
            del headers[name]

    assert _download_with_headers(tmp_path, monkeypatch, drop_length) == "download"
    assert bars[0]["total"] is None and (tmp_path / "o.bin").read_bytes() == PAYLOAD


def test_a_non_numeric_content_length_is_ignored(tmp_path, bars, monkeypatch):
    edit = lambda headers: headers.replace_header("Content-length", "12abc")   # noqa: E731
    assert _download_with_headers(tmp_path, monkeypatch, edit) == "download"
    assert bars[0]["total"] is None


def test_a_wrong_download_checksum_names_both_digests_and_keeps_nothing(tmp_path):
    source = tmp_path / "served.csv"
    source.write_bytes(PAYLOAD + b"extra")
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        fetch(out / "ETTh1.csv", source.as_uri(), _sha256(PAYLOAD), "sha256", None, "use the mirror")
    message = str(caught.value)
    assert f"download {source.as_uri()}: sha256 is {_sha256(PAYLOAD + b'extra')}, expected {_sha256(PAYLOAD)}" \
        in message and message.endswith("Ways out: use the mirror")
    assert _files(out) == []


def test_an_unreachable_source_says_what_was_tried_and_keeps_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    out = tmp_path / "out"
    url = (tmp_path / "missing.csv").as_uri()
    with pytest.raises(DataError) as caught:
        fetch(out / "ETTh1.csv", url, _sha256(PAYLOAD), "sha256", mirror, "set DATA_MIRROR")
    message = str(caught.value)
    assert message.startswith("could not get ETTh1.csv. Tried:\n  - ")
    assert f"  - mirror {mirror / 'ETTh1.csv'}: no such file\n  - download {url}: " in message
    assert message.endswith("\nWays out: set DATA_MIRROR")
    assert _files(out) == []
    # Without a mirror only the download is listed.
    with pytest.raises(DataError) as caught:
        fetch(out / "ETTh1.csv", url, _sha256(PAYLOAD))
    assert "mirror" not in str(caught.value) and f"Tried:\n  - download {url}: " in str(caught.value)


def test_the_partial_file_is_removed_even_when_the_copy_fails_midway(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "big.bin").write_bytes(PAYLOAD)

    written_to = []

    def broken_copy(source, out, total, desc):
        written_to.append(Path(out.name))
        out.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch_module, "_copy", broken_copy)
    with pytest.raises(KeyboardInterrupt):
        fetch(tmp_path / "out" / "big.bin", "file:///nonexistent", _sha256(PAYLOAD), "sha256", mirror)
    assert written_to == [tmp_path / "out" / "big.bin.partial"]   # never under the final name
    assert _files(tmp_path / "out") == []


class _Reads:
    """A file object that records the size of every read."""

    def __init__(self, f):
        self.f, self.sizes = f, []

    def read(self, size=-1):
        self.sizes.append(size)
        return self.f.read(size)


def test_copy_moves_every_chunk_in_bounded_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "CHUNK", 7)   # many small chunks
    data = os.urandom(1000)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as f, open(tmp_path / "dst", "wb") as out:
        src = _Reads(f)
        fetch_module._copy(src, out, len(data), "x")
    assert (tmp_path / "dst").read_bytes() == data
    assert src.sizes == [7] * (1000 // 7 + 2)   # never the whole file at once: 143 full/partial reads + b""


def test_the_copy_is_logged_with_its_size_in_binary_units_from_start_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = b"x" * (3 * 1024 * 1024)   # 3 MiB
    (mirror / "set.npz").write_bytes(data)
    assert fetch(tmp_path / "set.npz", "file:///nonexistent", _sha256(data), "sha256", mirror) == "mirror"
    lines = capsys.readouterr().err.splitlines()   # captured: plain lines, not a redrawn bar
    assert lines[0].startswith("set.npz (mirror):   0% 0.00/3.00M B [")     # shown at once, not after 30 s
    assert lines[-1].startswith("set.npz (mirror): 100% 3.00M/3.00M B [")   # and kept at the end


def test_the_default_algorithm_is_sha256_and_the_default_way_out_is_empty(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.csv").write_bytes(b"bad")
    with pytest.raises(DataError) as caught:
        fetch(tmp_path / "a.csv", "file:///nonexistent", _sha256(b"good"), mirror=mirror)
    assert f"sha256 is {_sha256(b'bad')}, expected {_sha256(b'good')}" in str(caught.value)
    assert str(caught.value).endswith("Ways out: ")


# ---------------------------------------------------------------- transport errors (issue 17.3)

def test_a_body_shorter_than_its_content_length_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    """No pin (expected ""): only Content-Length can tell that the connection was cut."""
    source = tmp_path / "served.bin"
    source.write_bytes(PAYLOAD)
    real_urlopen = urllib.request.urlopen

    def urlopen(url, *args, **kwargs):
        response = real_urlopen(url, *args, **kwargs)
        response.headers.replace_header("Content-length", str(len(PAYLOAD) + 10))
        return response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        fetch(out / "o.bin", source.as_uri(), "", "sha256", None, "set DATA_MIRROR")
    message = str(caught.value)
    assert f"the connection ended after {len(PAYLOAD)} of {len(PAYLOAD) + 10} bytes" in message
    assert message.endswith("\nWays out: set DATA_MIRROR")
    assert _files(out) == []


class _CutServer:
    """A real HTTP server that promises 1000 bytes and sends 100, then closes the connection."""

    def __enter__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"x" * 100)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}/f.csv"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_connection_cut_mid_body_is_the_one_clear_message(tmp_path):
    out = tmp_path / "out"
    with _CutServer() as url, pytest.raises(DataError) as caught:
        fetch(out / "f.csv", url, "", "sha256", None, "set DATA_MIRROR")
    message = str(caught.value)
    assert message.startswith(f"could not get f.csv. Tried:\n  - download {url}: ")
    assert message.endswith("\nWays out: set DATA_MIRROR") and _files(out) == []


@pytest.mark.parametrize("error", [http.client.IncompleteRead(b"abc", 7), http.client.RemoteDisconnected("gone"),
                                   http.client.BadStatusLine("junk")])
def test_every_http_client_error_becomes_the_one_clear_message(tmp_path, monkeypatch, error):
    def urlopen(url, *args, **kwargs):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError) as caught:
        fetch(tmp_path / "out" / "f.csv", "http://example.invalid/f.csv", "", "sha256", None, "set DATA_MIRROR")
    assert str(caught.value).startswith("could not get f.csv. Tried:\n  - download http://example.invalid/f.csv: ")
    assert _files(tmp_path / "out") == []


def test_a_relative_mirror_is_read_from_the_users_repository_also_in_a_queued_runs_copy(monkeypatch, tmp_path):
    """Queued runs work in <repo>/.dvc/tmp/exps/tmpXXXX/: a relative DATA_MIRROR means <repo>/<it> (18.7)."""
    from pipeline import paths

    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12")
    monkeypatch.setenv("DATA_MIRROR", "../shared/data")
    assert mirror_dir("") == tmp_path / "repo" / ".." / "shared" / "data"
    monkeypatch.delenv("DATA_MIRROR")
    assert mirror_dir("my_data") == tmp_path / "repo" / "my_data"
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "plain")
    assert mirror_dir("my_data") == tmp_path / "plain" / "my_data"


@pytest.mark.parametrize("error, problem", [(OSError("Network is unreachable"), "Network is unreachable"),
                                            (ConnectionResetError(), "ConnectionResetError")])
def test_a_failed_download_is_named_by_its_message_or_else_its_type(tmp_path, monkeypatch, error, problem):
    def urlopen(url, *args, **kwargs):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError) as caught:
        fetch(tmp_path / "out" / "f.csv", "http://example.invalid/f.csv", "", "sha256", None, "set DATA_MIRROR")
    assert str(caught.value) == ("could not get f.csv. Tried:\n  - download http://example.invalid/f.csv: "
                                 f"{problem}\nWays out: set DATA_MIRROR")
