"""Writing files so that a reader, or a killed process, sees the old file or the whole new one."""
import json
import os
import sys
import tempfile
import traceback

from .data import DataError, not_a_file


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
        raise not_a_file(path)
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")


def one_line_errors(run, error_type=DataError):
    """``run()``, with every error as one line: a bad input (``error_type``) as ``error: <its message>``, any
    other exception as ``error: <type>: <message> (full trace in <file>)`` with the traceback written to a
    temporary file; exit status 1. SystemExit and KeyboardInterrupt pass as they are."""
    try:
        return run()
    except error_type as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    except Exception as e:
        message = " ".join(str(e).split()) or "(no message)"
        try:
            with tempfile.NamedTemporaryFile("w", prefix="kosent-error-", suffix=".log", delete=False) as f:
                traceback.print_exc(file=f)
            where = f"full trace in {f.name}"
        except OSError as log_error:
            where = f"no trace written: {log_error.strerror or log_error}"
        sys.exit(f"error: {type(e).__name__}: {message} ({where})")


def check_device(parser, device):
    """parser.error unless ``device`` (--device) names a device this machine has: cpu, cuda, cuda:N, mps."""
    import torch
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {device}: not a device name (cpu, cuda, cuda:N)")
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            parser.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        parser.error(f"--device {device}: MPS is not available on this machine")


class FolderLock:
    """An exclusive lock on a folder (folder/.lock, flock): a second holder while a live process holds it
    is refused with SystemExit(``in_use(pid of the holder)``). The kernel drops the lock when its process
    exits, so a crashed or killed holder leaves no stale lock behind (its file, with the dead holder's pid,
    is simply taken over); ``release`` removes the file, and the folder too if the lock created it and
    nothing else is in it. (filelock's FileLock takes the same flock but cannot say who holds it, and leaves its
    file or folder behind: the one-line refusal naming the live run's pid is why this is kept.)"""

    def __init__(self, folder, in_use):
        self.path, self.file, self.created = os.path.join(folder, ".lock"), None, not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        file = open(self.path, "a+")
        try:
            import fcntl
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise SystemExit(in_use(holder)) from None
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        self.file = file

    def release(self):
        if self.file is not None:
            os.remove(self.path)  # still holding the lock, so no other process is between check and removal
            self.file.close()  # closing the descriptor releases the flock
            self.file = None
            folder = os.path.dirname(self.path)
            if self.created and not os.listdir(folder):
                os.rmdir(folder)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.release()
        return False
