"""Getting a data file into place: from a mirror folder or the network, checksum-verified, atomic.

A file is written to `<dest>.partial` and moved into place only after its checksum matched, so
an interrupted or failed fetch never leaves a file that a later stage (or DVC) would accept.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from pipeline import progress
from pipeline.errors import DataError
from pipeline.paths import user_path

NETWORK_TIMEOUT_S = 15
CHUNK = 1 << 20


def _copy(source, out, total: int | None, desc: str) -> None:
    """Copy a file object to `out` in chunks, showing bytes, rate and time left (`total` known)."""
    with progress.bar(total, desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                      quiet_start=False) as shown:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            out.write(chunk)
            shown.update(len(chunk))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mirror_dir(param_value: str) -> Path | None:
    """The mirror folder: $DATA_MIRROR if set, else the `data.mirror_dir` param, else none; a relative
    one is read from the user's repository (also in a queued run's temporary copy)."""
    value = os.environ.get("DATA_MIRROR") or param_value
    return user_path(value) if value else None


def _verify(path: Path, expected: str, algorithm: str, origin: str, way_out: str) -> None:
    if not expected:
        return
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(f"{origin}: {algorithm} is {actual}, expected {expected} (truncated or corrupt "
                        f"file). Nothing was kept. Ways out: {way_out}")


def fetch(dest: Path, url: str, expected: str, algorithm: str = "sha256",
          mirror: Path | None = None, way_out: str = "") -> str:
    """Put the file at `dest`; return where it came from ("mirror" or "download").

    Tries the mirror's file of the same name first (when a mirror is given), else the URL.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    tried = []
    try:
        if mirror is not None:
            source = mirror / dest.name
            if source.exists():
                with open(source, "rb") as src, open(partial, "wb") as out:
                    _copy(src, out, source.stat().st_size, f"{dest.name} (mirror)")
                _verify(partial, expected, algorithm, f"mirror file {source}", way_out)
                os.replace(partial, dest)
                return "mirror"
            tried.append(f"mirror {source}: no such file")
        try:
            with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as response, open(partial, "wb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                _copy(response, out, total, dest.name)
            got = partial.stat().st_size
            # checked even without a pin, so a cut-off unpinned file is never kept
            problem = f"the connection ended after {got} of {total} bytes" if total not in (None, got) else ""
        # URLError, timeouts and HTTP errors are OSErrors; a connection cut mid-body is an HTTPException
        except (OSError, http.client.HTTPException) as error:
            problem = str(error) or type(error).__name__
        if problem:
            tried.append(f"download {url}: {problem}")
            raise DataError(f"could not get {dest.name}. Tried:\n  - " + "\n  - ".join(tried)
                            + f"\nWays out: {way_out}")
        _verify(partial, expected, algorithm, f"download {url}", way_out)
        os.replace(partial, dest)
        return "download"
    finally:
        partial.unlink(missing_ok=True)
