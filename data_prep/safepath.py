"""Reading files referenced by a corpus without ever leaving its root, and without unbounded reads.

A reference is resolved against the directory of the file that makes it, then every symlink and `..`
is resolved (`os.path.realpath`) and the result must lie inside the root (itself resolved). Absolute
paths, `file:` and network URLs are refused: nothing is ever fetched. Only regular files are read
(a FIFO or a device would block or never end), and never more than `max_bytes + 1` bytes.
"""
from __future__ import annotations

import os
import stat
from urllib.parse import unquote, urlsplit

REMOTE_SCHEMES = ("http", "https", "ftp", "ftps", "s3", "gs")


def real_root(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def is_inside(root_real: str, path_real: str) -> bool:
    return path_real == root_real or path_real.startswith(root_real.rstrip(os.sep) + os.sep)


def resolve_reference(root_real: str, base_dir: str, ref: str, url_encoded: bool = False) -> tuple[str, str]:
    """(real path, "") or ("", reason) for a reference made by a file in `base_dir`.

    `url_encoded`: the reference comes from HTML (`src="a%20b.png?x=1#y"`): strip query and fragment,
    percent-decode. Reasons: remote_image, outside_root.
    """
    ref = ref.strip()
    if url_encoded:
        parts = urlsplit(ref)
        if parts.scheme.lower() in REMOTE_SCHEMES or parts.netloc or ref.startswith("//"):
            return "", "remote_image"
        if parts.scheme:  # file:, javascript:, blob:, ... (data: is handled by the HTML reader)
            return "", "outside_root"
        ref = unquote(parts.path)
    elif "://" in ref:
        return "", "remote_image" if ref.split("://", 1)[0].lower() in REMOTE_SCHEMES else "outside_root"
    if not ref or "\x00" in ref:
        return "", "missing_image"
    if os.path.isabs(ref) or ref.startswith(("/", "\\")):
        return "", "outside_root"
    path = os.path.realpath(os.path.join(base_dir, ref))
    if not is_inside(root_real, path):
        return "", "outside_root"
    return path, ""


def read_bounded(path: str, max_bytes: int, too_large: str = "image_too_large",
                 missing: str = "missing_image") -> tuple[bytes | None, str]:
    """(bytes, "") or (None, reason) for a regular file of at most `max_bytes` bytes."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None, missing
    except OSError:
        return None, "bad_file"
    if not stat.S_ISREG(st.st_mode):
        return None, missing if stat.S_ISDIR(st.st_mode) else "bad_file"
    if st.st_size == 0:
        return None, "empty_file"
    if st.st_size > max_bytes:
        return None, too_large
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError:
        return None, "bad_file"
    if len(data) > max_bytes:
        return None, too_large
    if not data:
        return None, "empty_file"
    return data, ""
