# Copied from KoSimCSE/common/files.py (whole file; delete this line to own it)
"""Writing files so that a reader, or a killed process, sees the old file or the whole new one."""
import json
import os

from .data import DataError


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(path, write):
    """Write ``path`` via ``write(binary file)`` into ``path.tmp``, fsync it, then os.replace it over
    ``path``: a reader (or a killed build) sees the old file or the whole new one, never a part. A failed
    write (OSError) removes the .tmp and is raised; ``path`` is untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a read-only folder, a kill: the old file stays, no .tmp is left
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_json_atomic(path, obj):
    save_atomic(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8")))


def require_file(path):
    """DataError unless ``path`` is a non-empty file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
