"""Errors that end a stage with one clear message (no traceback) and exit code 2, and the one
redaction every message and written text goes through."""

from __future__ import annotations

import errno
import os
import re


class DataError(RuntimeError):
    """A dataset could not be put in place or is malformed; the message says what to do."""


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says why and what to do."""


# Disk full (ENOSPC), file size limit (EFBIG, RLIMIT_FSIZE), quota (EDQUOT).
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

# user:password@ in any URI (http, s3, postgresql, ...), wherever it appears in a text.
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]*:[^/\s@]*@")
# Environment variables whose values are secrets (their values are removed from every text).
_SECRET_ENV = re.compile(r"(PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY)$", re.IGNORECASE)


def disk_full_message(error: OSError, what: str = "") -> str:
    where = f" writing {what}" if what else (f" writing {error.filename}" if error.filename else "")
    return (f"the disk is full{where} ({error.strerror or error}); nothing half-written was kept. "
            "Free space (or point TMPDIR / the repository at a larger disk) and re-run the stage.")


def _secret_values() -> set[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}
    for uri_var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        match = re.search(r"://[^/\s@:]*:([^/\s@]+)@", os.environ.get(uri_var, ""))
        if match and len(match.group(1)) >= 8:
            values.add(match.group(1))
    return values


def redact(text: str) -> str:
    """`text` without credentials: user:password@ in URIs becomes ***@, and the value of any
    secret in the environment (passwords, keys, tokens, a tracking URI's password) becomes ***."""
    text = _URI_CREDENTIALS.sub(r"\g<scheme>***@", text)
    for value in sorted(_secret_values(), key=len, reverse=True):
        text = text.replace(value, "***")
    return text
