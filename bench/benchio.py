"""Result files of the bench scripts, written so that a kill or a full disk never leaves a torn one.

A bench run can take an hour; its JSON is what README and bench/README.md quote. ``write_text`` writes a
temporary file beside the target and renames it into place (``os.replace`` is atomic on one file system), so
the previous result stays whole until the new one is complete. An unwritable or full target is one line.
"""
import json
import os
import sys


def write_text(path, text):
    """Write ``text`` to ``path`` atomically (its folder made if needed); exit with one line on failure."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        sys.exit(f"error: could not write {path}: {e.strerror or e}")


def write_json(path, obj, **dump_kwargs):
    """``json.dumps(obj, **dump_kwargs)`` written to ``path`` by ``write_text``."""
    write_text(path, json.dumps(obj, **dump_kwargs))
