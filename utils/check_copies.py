"""Keep the code that method folders copy from each other in sync.

Each method folder is standalone, so shared code is copied on purpose, in two ways:

* Whole files, listed in FULL_COPIES below (the plumbing ``run_utils.py``, ``evaluation.py``, ...): the
  copy must equal its origin byte for byte, docstring, constants and ``__main__`` included.
* Single definitions, marked by a comment on the line right above a top-level ``def``/``class`` or a
  module-level constant::

      # Copied from KoSimCSE/dataloader.py:read_sts
      def read_sts(path):

  The definition must equal the origin's. The module-level constants that a copied function reads
  (``STS_SPLITS`` in ``resolve_path``, say) must be equal in both files too, so a copy cannot drift
  through a constant.

This script exits 1 listing every copy that drifted and every marker it cannot resolve; ``--fix``
rewrites the copies from their origins. ``--unguarded`` reads a repeated-block scan (the ``duplicates``
tool's report) and lists the pairs across method folders that nothing here guards.

    python utils/check_copies.py [--fix]
    duplicates --most 200 | python utils/check_copies.py --unguarded -
"""
import argparse
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"^# Copied from (?P<file>\S+?):(?P<name>\S+)\s*$")
METHOD_FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")

# copy -> origin, relative to the repository root.
FULL_COPIES = {
    **{f"{folder}/run_utils.py": "KoSimCSE/run_utils.py" for folder in METHOD_FOLDERS[1:]},
    **{f"{folder}/evaluation.py": "KoSimCSE/evaluation.py" for folder in METHOD_FOLDERS[1:]},
    "KoSentenceT5/dataloader.py": "KoSimCSE/dataloader.py",
}


def _top_level(source, path):
    """{name: (first line, last line, node)} of the top-level functions, classes and single-name
    assignments of a module (1-based, inclusive, decorators included)."""
    spans = {}
    for node in ast.parse(source, path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans[node.name] = (first, node.end_lineno, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    spans[target.id] = (node.lineno, node.end_lineno, node)
    return spans


def _names_read(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def find_copies(root):
    """[(copy path, mark line number (1-based), origin path, name)] for every marked copy under root."""
    copies = []
    for folder in sorted(os.listdir(root)):
        folder_path = os.path.join(root, folder)
        if not os.path.isdir(folder_path) or folder.startswith((".", "_")) or folder in ("tests", "utils"):
            continue
        for file in sorted(os.listdir(folder_path)):
            if file.endswith(".py"):
                path = os.path.join(folder_path, file)
                with open(path, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        m = MARK.match(line)
                        if m:
                            copies.append((path, lineno, os.path.join(root, m["file"]), m["name"]))
    return copies


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_full_copies(root, fix, full_copies):
    problems = []
    for copy, origin in full_copies.items():
        copy_path, origin_path = os.path.join(root, copy), os.path.join(root, origin)
        if not os.path.isfile(origin_path):
            problems.append(f"{copy}: origin file {origin} (FULL_COPIES) does not exist")
            continue
        if not os.path.isfile(copy_path) or _read(copy_path) != _read(origin_path):
            problems.append(f"{copy}: differs from {origin} (a whole-file copy)")
            if fix:
                with open(copy_path, "w", encoding="utf-8") as f:
                    f.write(_read(origin_path))
    return problems


def _check_marked(path, mark_line, origin, name, root, fix):
    """Problems of one marked copy (and of the constants it reads); rewrites it with fix=True."""
    where = f"{os.path.relpath(path, root)}:{mark_line}"
    rel_origin = os.path.relpath(origin, root)
    if "." in name:
        return [f"{where}: `{name}` is a nested name; mark the top-level definition that holds it"]
    if not os.path.isfile(origin):
        return [f"{where}: origin file {rel_origin} does not exist"]
    origin_source = _read(origin)
    origin_defs = _top_level(origin_source, origin)
    if name not in origin_defs:
        return [f"{where}: {rel_origin} has no top-level {name}"]
    lines = _read(path).splitlines(keepends=True)
    copy_defs = _top_level("".join(lines), path)
    if name not in copy_defs or copy_defs[name][0] != mark_line + 1:
        return [f"{where}: the marker must sit right above the definition of {name}"]
    origin_lines = origin_source.splitlines(keepends=True)
    problems, edits = [], []
    first, last, node = origin_defs[name]
    if lines[copy_defs[name][0] - 1:copy_defs[name][1]] != origin_lines[first - 1:last]:
        problems.append(f"{where}: {name} differs from {rel_origin}")
        edits.append((copy_defs[name], origin_lines[first - 1:last]))
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
        for const in sorted(_names_read(node)):
            spec = origin_defs.get(const)
            if spec is None or not isinstance(spec[2], (ast.Assign, ast.AnnAssign)):
                continue  # not a module-level constant of the origin
            wanted = origin_lines[spec[0] - 1:spec[1]]
            if const not in copy_defs:
                problems.append(f"{where}: {name} reads the constant {const}, which "
                                f"{os.path.relpath(path, root)} does not define")
            elif lines[copy_defs[const][0] - 1:copy_defs[const][1]] != wanted:
                problems.append(f"{where}: the constant {const} that {name} reads differs from {rel_origin}")
                edits.append((copy_defs[const], wanted))
    if fix and edits:
        for (start, end, _), wanted in sorted(edits, key=lambda e: -e[0][0]):  # bottom-up: no line shifts
            lines[start - 1:end] = wanted
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
    return problems


def check(root=ROOT, fix=False, full_copies=None):
    """List of problems (empty when every copy matches its origin); with fix=True, rewrite copies."""
    full_copies = FULL_COPIES if full_copies is None else full_copies
    problems = _check_full_copies(root, fix, full_copies)
    whole, marked = {os.path.join(root, c) for c in full_copies}, []
    # Bottom-up, so that rewriting one copy does not shift the lines of the markers above it.
    for path, mark_line, origin, name in reversed(find_copies(root)):
        if path not in whole:  # a whole-file copy is checked as a whole (its markers came with its origin)
            marked = _check_marked(path, mark_line, origin, name, root, fix) + marked
    return problems + marked


def guarded_lines(root=ROOT, full_copies=None):
    """{relative path: set of 1-based line numbers} that the checker guards: every line of a whole-file copy
    and of its origin, and the span of every marked copy and of the definition it copies."""
    full_copies = FULL_COPIES if full_copies is None else full_copies
    guarded = {}
    for copy, origin in full_copies.items():
        for rel in (copy, origin):
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                guarded[rel] = set(range(1, len(f.readlines()) + 1))
    for path, mark_line, origin, name in find_copies(root):
        for file in (path, origin):
            defs = _top_level(_read(file), file) if os.path.isfile(file) else {}
            if name not in defs:
                continue
            first = mark_line if file == path else defs[name][0]
            lines = guarded.setdefault(os.path.relpath(file, root), set())
            lines.update(range(first, defs[name][1] + 1))
            for const in _names_read(defs[name][2]):  # the constants it reads are checked too
                if const in defs and isinstance(defs[const][2], (ast.Assign, ast.AnnAssign)):
                    lines.update(range(defs[const][0], defs[const][1] + 1))
    return guarded


def unguarded_pairs(duplicates_output, root=ROOT):
    """The rows of a ``duplicates`` report that pair two method folders without the checker guarding either
    side. A side is guarded when no 6 consecutive code lines of it (the scan's own threshold for a repeated
    block) lie outside guarded_lines: a run may spill a line or two past a copied definition."""
    guarded, files, rows = guarded_lines(root), {}, []

    def covered(rel, first, last):
        if rel not in files:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                files[rel] = f.readlines()
        lines = files[rel]
        code = [n for n in range(first, last + 1) if lines[n - 1].strip() and not lines[n - 1].lstrip().startswith("#")]
        run = longest = 0
        for n in code:
            run = 0 if n in guarded.get(rel, ()) else run + 1
            longest = max(longest, run)
        return longest < 6

    pair = re.compile(r"^(D\d+) (\S+):(\d+)-(\d+) ~ (\S+):(\d+)-(\d+)")
    for line in duplicates_output.splitlines():
        m = pair.match(line)
        if not m:
            continue
        sides = [(m[2], int(m[3]), int(m[4])), (m[5], int(m[6]), int(m[7]))]
        folders = {s[0].split("/")[0] for s in sides}
        if len(folders) < 2 or not folders <= set(METHOD_FOLDERS):
            continue  # not a pair across method folders
        if not any(covered(*side) for side in sides):
            rows.append(line)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="overwrite drifted copies with their origin")
    parser.add_argument("--unguarded", metavar="REPORT",
                        help="a `duplicates` report (file, or - for stdin): list its cross-folder pairs that no copy "
                             "check guards, and exit 1 if there are any")
    args = parser.parse_args()
    if args.unguarded:
        report = sys.stdin.read() if args.unguarded == "-" else _read(args.unguarded)
        rows = unguarded_pairs(report)
        print("\n".join(rows + [f"{len(rows)} cross-folder pair(s) not guarded by the copy check"]))
        sys.exit(1 if rows else 0)
    if args.fix:
        check(fix=True)
    problems = check()
    for problem in problems:
        print(problem)
    marked = sum(1 for path, *_ in find_copies(ROOT) if os.path.relpath(path, ROOT) not in FULL_COPIES)
    print(f"{len(FULL_COPIES)} whole-file copies, {marked} marked copies, {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
