"""Keep the code that method folders copy from each other in sync.

Each method folder is standalone, so shared code (readers, the 8-metric evaluation, ...) is copied
on purpose. A copy is marked by a comment on the line right above its ``def``/``class``::

    # Copied from KoSimCSE/evaluation.py:sts_metrics
    def sts_metrics(...):

This script checks that every marked copy is character-for-character equal to its origin and
exits 1 listing the ones that drifted. ``--fix`` rewrites the copies from their origins.

    python utils/check_copies.py [--fix]
"""
import argparse
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"^# Copied from (?P<file>[\w./-]+\.py):(?P<name>[\w.]+)\s*$")


def _definition_span(source, name, path):
    """(first line, last line) -- 1-based, inclusive, decorators included -- of top-level ``name``."""
    for node in ast.parse(source, path).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return first, node.end_lineno
    return None


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


def check(root=ROOT, fix=False):
    """List of problems (empty when every copy matches its origin); with fix=True, rewrite copies."""
    problems = []
    # Bottom-up, so that rewriting one copy does not shift the lines of those above it.
    for path, mark_line, origin, name in reversed(find_copies(root)):
        where = f"{os.path.relpath(path, root)}:{mark_line}"
        if not os.path.isfile(origin):
            problems.append(f"{where}: origin file {os.path.relpath(origin, root)} does not exist")
            continue
        with open(origin, encoding="utf-8") as f:
            origin_source = f.read()
        span = _definition_span(origin_source, name, origin)
        if span is None:
            problems.append(f"{where}: {os.path.relpath(origin, root)} has no top-level {name}")
            continue
        wanted = origin_source.splitlines(keepends=True)[span[0] - 1:span[1]]
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        copy_span = _definition_span("".join(lines), name, path)
        if copy_span is None or copy_span[0] != mark_line + 1:
            problems.append(f"{where}: the marker must sit right above `def/class {name}`")
            continue
        if lines[copy_span[0] - 1:copy_span[1]] != wanted:
            problems.append(f"{where}: {name} differs from {os.path.relpath(origin, root)}")
            if fix:
                lines[copy_span[0] - 1:copy_span[1]] = wanted
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(lines)
    return problems[::-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fix", action="store_true", help="overwrite drifted copies with their origin")
    args = parser.parse_args()
    if args.fix:
        check(fix=True)
    problems = check()
    for problem in problems:
        print(problem)
    print(f"{len(find_copies(ROOT))} marked copies, {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
