"""bench/benchio.py: a bench result file is whole or absent, never torn, and every bench script writes its
results through it (a kill or full disk during an hour-long bench must not leave half a JSON that README quotes)."""
import ast
import errno
import glob
import importlib.util
import json
import os

import pytest

from conftest import ROOT


def load_benchio():
    spec = importlib.util.spec_from_file_location("benchio", os.path.join(ROOT, "bench", "benchio.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_json_replaces_the_file_whole(tmp_path):
    benchio = load_benchio()
    path = tmp_path / "deep" / "result.json"
    benchio.write_json(str(path), {"a": 1}, indent=2)
    benchio.write_json(str(path), {"a": 2, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1, 2]}
    assert os.listdir(path.parent) == ["result.json"]  # no temporary file left


def test_a_full_disk_keeps_the_previous_result_and_is_one_line(tmp_path, monkeypatch):
    benchio = load_benchio()
    path = tmp_path / "result.json"
    benchio.write_json(str(path), {"old": True})

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(benchio.os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        benchio.write_json(str(path), {"new": True})
    assert str(e.value) == f"error: could not write {path}: No space left on device"
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["result.json"]


def test_an_unwritable_target_is_one_line(tmp_path):
    benchio = load_benchio()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        benchio.write_text(str(tmp_path / "file" / "result.json"), "{}")
    assert str(e.value).startswith(f"error: could not write {tmp_path / 'file' / 'result.json'}: ")


def test_no_bench_script_dumps_json_into_a_file_itself():
    """json.dump(obj, file) anywhere in bench/ but benchio.py would be a result written in place."""
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        if os.path.basename(path) == "benchio.py":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dump" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "json":
                offenders.append(f"{os.path.basename(path)}:{node.lineno}")
    assert offenders == [], offenders
