"""Keep the code that method folders copy from each other in sync, and make sure a copy runs where it lands.

Each method folder is standalone, so shared code is copied on purpose, in two ways:

* Whole files, marked by their first line (``KoSBERT/common/flags.py``, ``KoSBERT/evaluation.py``, ...)::

      # Copied from KoSimCSE/common/flags.py (whole file; delete this line to own it)

  The rest of the file must equal its origin byte for byte.
* Single definitions, marked by a comment on the line right above a top-level ``def``/``class`` or a
  module-level constant::

      # Copied from KoSimCSE/model.py:contrastive_loss
      def contrastive_loss(embeddings, num_columns, temperature):

  The definition must equal the origin's. The module-level constants that a copied function reads
  must be equal in both files too, so a copy cannot drift through a constant.

Every file holding a copy must also run where it lands: a name it uses must be defined or imported there
(pyflakes' undefined names), and a name it imports from a module of its own folder must exist in that
module. So a copied call whose import or helper did not come along fails the check.

To change a copy for one method only, delete its marker line: the file (or definition) is then that
folder's own and no longer checked. This script exits 1 listing every problem; ``--fix`` rewrites drifted
copies from their origins (the right repair when the origin was edited, and the wrong one when the copy
was: it would undo that edit). ``--unguarded`` reads a repeated-block scan (the ``duplicates`` tool's
report) and lists the pairs across method folders that nothing here guards.

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
WHOLE = re.compile(r"^# Copied from (?P<file>\S+\.py) \(whole file; delete this line to own it\)\s*$")
METHOD_FOLDERS = ("KoSimCSE", "KoSBERT", "KoSentenceT5", "KoDiffCSE")
EDITED = ("if you edited the origin, run `python utils/check_copies.py --fix`; if you edited the copy, delete "
          "its marker line to own it")


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


def _python_files(root):
    """Every .py file under the method folders (tests, utils and hidden folders excluded)."""
    for folder in sorted(os.listdir(root)):
        folder_path = os.path.join(root, folder)
        if not os.path.isdir(folder_path) or folder.startswith((".", "_")) or folder in ("tests", "utils"):
            continue
        for here, dirs, files in os.walk(folder_path):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            for file in sorted(files):
                if file.endswith(".py"):
                    yield os.path.join(here, file)


def find_whole_copies(root):
    """{copy path: origin path} of every file whose first line is a whole-file copy marker."""
    copies = {}
    for path in _python_files(root):
        with open(path, encoding="utf-8") as f:
            m = WHOLE.match(f.readline())
        if m:
            copies[path] = os.path.join(root, m["file"])
    return copies


def find_copies(root):
    """[(copy path, mark line number (1-based), origin path, name)] for every marked definition under root
    (whole-file copies excluded: they are checked as a whole)."""
    copies, whole = [], find_whole_copies(root)
    for path in _python_files(root):
        if path in whole:
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                m = MARK.match(line)
                if m:
                    copies.append((path, lineno, os.path.join(root, m["file"]), m["name"]))
    return copies


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_whole_copies(root, fix):
    problems = []
    for copy, origin in find_whole_copies(root).items():
        rel, rel_origin = os.path.relpath(copy, root), os.path.relpath(origin, root)
        if not os.path.isfile(origin):
            problems.append(f"{rel}:1: origin file {rel_origin} does not exist")
            continue
        marker, _, body = _read(copy).partition("\n")
        if body != _read(origin):
            problems.append(f"{rel}: differs from {rel_origin} (a whole-file copy): {EDITED}")
            if fix:
                with open(copy, "w", encoding="utf-8") as f:
                    f.write(marker + "\n" + _read(origin))
    return problems


def _local_modules(path):
    """{module name: file} importable from the method folder of ``path`` (its top-level .py files and
    common/*.py as ``common.NAME``)."""
    folder = os.path.dirname(path)
    if os.path.basename(folder) == "common":
        folder = os.path.dirname(folder)
    modules = {}
    for sub, prefix in ((folder, ""), (os.path.join(folder, "common"), "common.")):
        if os.path.isdir(sub):
            for file in os.listdir(sub):
                if file.endswith(".py") and file != "__init__.py":
                    modules[prefix + file[:-3]] = os.path.join(sub, file)
    return modules


def unresolved_names(path, root=ROOT):
    """Problems that would stop ``path`` where it is: names used but neither defined nor imported
    (pyflakes), and names imported from a module of its own method folder that does not define them."""
    from pyflakes import api, messages, reporter as pyflakes_reporter

    class Collect(pyflakes_reporter.Reporter):
        def __init__(self):
            self.found = []

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedExport)):
                self.found.append(f"{os.path.relpath(path, root)}:{message.lineno}: "
                                  f"{message.message % message.message_args}")

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{os.path.relpath(path, root)}:{lineno}: syntax error: {msg}")

        def unexpectedError(self, filename, msg):
            self.found.append(f"{os.path.relpath(path, root)}: {msg}")

    collect = Collect()
    source = _read(path)
    api.check(source, path, collect)
    if collect.found:
        return collect.found
    modules, in_common = _local_modules(path), os.path.basename(os.path.dirname(path)) == "common"
    for node in ast.walk(ast.parse(source, path)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = ("common." + (node.module or "")) if (in_common and node.level == 1) else node.module
        if node.level > 1 or module not in modules:
            continue
        defined = set(_top_level(_read(modules[module]), modules[module])) | _imported(modules[module])
        for alias in node.names:
            if alias.name != "*" and alias.name not in defined:
                collect.found.append(f"{os.path.relpath(path, root)}:{node.lineno}: imports {alias.name} from "
                                     f"{module}, which does not define it")
    return collect.found


def _imported(path):
    names = set()
    for node in ast.parse(_read(path), path).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


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
        problems.append(f"{where}: {name} differs from {rel_origin}: {EDITED}")
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


def check(root=ROOT, fix=False):
    """List of problems (empty when every copy matches its origin and every file holding a copy runs where
    it is); with fix=True, rewrite drifted copies from their origins first."""
    problems = _check_whole_copies(root, fix)
    marked = []
    # Bottom-up, so that rewriting one copy does not shift the lines of the markers above it.
    for path, mark_line, origin, name in reversed(find_copies(root)):
        marked = _check_marked(path, mark_line, origin, name, root, fix) + marked
    holders = sorted(set(find_whole_copies(root)) | {path for path, *_ in find_copies(root)})
    holders += sorted({origin for origin in find_whole_copies(root).values()} - set(holders))
    unresolved = [p for path in holders if os.path.isfile(path) for p in unresolved_names(path, root)]
    return problems + marked + unresolved


def guarded_lines(root=ROOT):
    """{relative path: set of 1-based line numbers} that the checker guards: every line of a whole-file copy
    and of its origin, and the span of every marked copy and of the definition it copies."""
    guarded = {}
    for copy, origin in find_whole_copies(root).items():
        for path in (copy, origin):
            with open(path, encoding="utf-8") as f:
                guarded[os.path.relpath(path, root)] = set(range(1, len(f.readlines()) + 1))
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
    try:
        import pyflakes  # noqa: F401  (the undefined-name check below)
    except ImportError:
        sys.exit("error: utils/check_copies.py needs pyflakes: pip install -r requirements-dev.txt")
    if args.fix:
        check(fix=True)
    problems = check()
    for problem in problems:
        print(problem)
    print(f"{len(find_whole_copies(ROOT))} whole-file copies, {len(find_copies(ROOT))} marked copies, "
          f"{len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
