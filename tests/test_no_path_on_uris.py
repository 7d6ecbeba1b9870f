"""Lint: no ``pathlib.Path`` around a run or data path anywhere in the package.

``Path("s3://bucket/runs")`` is the local path ``s3:/bucket/runs``: every read then misses and every write lands in
a folder named ``s3:`` on whichever node ran it, silently. Run and data paths are strings handled by
``reclip_ray.storage``. The rule, on every ``Path(...)`` (also ``pathlib.Path``, ``PurePath``, ``PosixPath``, any
alias) in ``reclip_ray/**/*.py``:

1. Forbidden outright: an argument that mentions a config path field (``cfg.data.train``, ``data.eval``,
   ``cfg.run.storage_path``, ``prep.run_dir``, ``loop_config["run_dir"]``, ``cfg.model.init_from``...). These are
   URIs whenever the user says so; no exception can be listed for them.
2. Flagged: an argument with a path-like name in it (``path``, ``out_dir``, ``root``, ``folder``, ``checkpoint``,
   ``uri``...). It passes when it is local by construction: every name in it starts with ``local`` or ``tmp``
   (the convention for a local copy or a temp dir: ``with local_copy(uri) as local``), or it is a call to
   ``tempfile.*`` or ``storage.local_path`` (None for a URI, so ``Path`` fails loudly instead of mis-parsing).
3. Anything else that is flagged must be listed in ``LOCAL_ONLY`` with the reason it can never be a URI. An entry
   that no longer matches anything fails the test too, so the list cannot rot.

Names without a path-like word (``Path(spec.origin)``: the package's own files) are not looked at.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reclip_ray"
PATH_CLASSES = {"Path", "PurePath", "PosixPath", "PurePosixPath"}
CONFIG_FIELDS = {"train", "eval", "tokenizer", "tokenizer_path", "storage_path", "run_dir", "init_from",
                 "checkpoint"}
PATH_WORD = re.compile(r"path|dir|folder|root|out|uri|data|train|eval|checkpoint|target|dst|src|file|model")
LOCAL_NAME = re.compile(r"^_?(local|tmp)")

# (module, function, argument as written) -> why it is local. Genuinely local paths only.
LOCAL_ONLY = {
    ("config.py", "load_raw", "name_or_path"): "a config YAML file, read by the driver from its own disk",
    ("data/clip_bpe.py", "clip_vocab_and_merges", "bpe_path"): "open_clip's vocabulary file inside the installed "
                                                                 "package",
    ("data/clip_bpe.py", "clip_tokenizer_file", "cache_dir"): "the user's cache folder (~/.cache/reclip_ray)",
    ("bench/e2e.py", "main", "args.data"): "a scratch dataset for a local timing run (made if missing)",
    ("sweep/space.py", "load_space", "path"): "a search-space YAML file, read by the driver like a config file",
    ("sweep/run.py", "open_sweep", "space_path"): "the search-space YAML file (as above)",
    ("report.py", "_check_store", "uri[len('sqlite:///'):]"): "an SQLite file: a local database by nature",
    ("tracking.py", "default_artifact_root", "tracking_uri[len('sqlite:///'):]"): "beside the SQLite file",
    ("train/checkpoint.py", "save_checkpoint", "directory"): "a local temp folder: Ray Train uploads it",
    ("train/checkpoint.py", "read_state", "directory"): "Checkpoint.as_directory(): Ray Train's local copy",
    ("train/checkpoint.py", "load_checkpoint", "directory"): "Checkpoint.as_directory(): Ray Train's local copy",
}



def _words(node: ast.AST) -> tuple[set[str], set[str]]:
    """(every name in an expression, the attribute names and subscript keys among them); the functions it calls
    are not counted (``str(root)`` names ``root``, not ``str``)."""
    names: set[str] = set()
    fields: set[str] = set()

    def walk(sub: ast.AST) -> None:
        if isinstance(sub, ast.Call):
            for child in [*sub.args, *(k.value for k in sub.keywords)]:
                walk(child)
            return
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr)
            fields.add(sub.attr)
        elif isinstance(sub, ast.Subscript) and isinstance(key := sub.slice, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
            fields.add(key.value)
        for child in ast.iter_child_nodes(sub):
            walk(child)

    walk(node)
    return names, fields


def _local_by_construction(arg: ast.AST) -> bool:
    if isinstance(arg, ast.Call):
        func = ast.unparse(arg.func)
        if func.startswith("tempfile.") or func in ("storage.local_path", "local_path"):
            return True
    names, _ = _words(arg)
    return bool(names) and all(LOCAL_NAME.match(n) for n in names)


def offenders(source: str) -> list[tuple[str, str, str]]:
    """(function, argument, "forbidden" | "flagged") for each ``Path(...)`` of a run or data path in ``source``."""
    tree = ast.parse(source)
    classes = set()
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pathlib":
            classes |= {a.asname or a.name for a in node.names if a.name in PATH_CLASSES}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "pathlib"}
    found: list[tuple[str, str, str]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + [node.name]
        if isinstance(node, ast.Call) and node.args and _is_path_class(node.func, classes, modules):
            arg = node.args[0]
            names, fields = _words(arg)
            if fields & CONFIG_FIELDS:
                found.append((".".join(scope), ast.unparse(arg), "forbidden"))
            elif any(PATH_WORD.search(n.lower()) for n in names) and not _local_by_construction(arg):
                found.append((".".join(scope), ast.unparse(arg), "flagged"))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return found


def _is_path_class(func: ast.AST, classes: set[str], modules: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in classes
    return (isinstance(func, ast.Attribute) and func.attr in PATH_CLASSES and isinstance(func.value, ast.Name)
            and func.value.id in modules)


@functools.lru_cache(maxsize=1)
def _package_offenders() -> dict[tuple[str, str, str], str]:
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        module = file.relative_to(PACKAGE).as_posix()
        for function, arg, kind in offenders(file.read_text()):
            out[(module, function, arg)] = kind
    return out


def test_no_run_or_data_path_is_wrapped_in_pathlib():
    found = _package_offenders()
    unexplained = [f"reclip_ray/{m}: {f}(): Path({a}) [{kind}]" for (m, f, a), kind in found.items()
                   if (kind == "forbidden" or (m, f, a) not in LOCAL_ONLY)]
    assert not unexplained, ("Path() on a run or data path (a URI would become a local path; use reclip_ray.storage, "
                             "or name a local copy local_*/tmp_*):\n" + "\n".join(unexplained))


def test_every_exception_still_matches_something():
    found = _package_offenders()
    stale = sorted(set(LOCAL_ONLY) - set(found))
    assert not stale, f"allow-list entries that match nothing any more (remove them): {stale}"
    assert not [k for k in LOCAL_ONLY if found[k] == "forbidden"], "a config path field cannot be local-only"


@pytest.mark.parametrize("source, expected", [
    ("from pathlib import Path\ndef f(cfg): return Path(cfg.data.train)", [("f", "cfg.data.train", "forbidden")]),
    ("import pathlib\ndef f(c): return pathlib.Path(c['run_dir']) / 'x'", [("f", "c['run_dir']", "forbidden")]),
    ("from pathlib import Path as P\ndef f(out_dir): P(out_dir).mkdir()", [("f", "out_dir", "flagged")]),
    ("from pathlib import Path\ndef f(run_dir): return Path(f'{run_dir}/x.json')", [("f", "f'{run_dir}/x.json'",
                                                                                     "flagged")]),
    ("from pathlib import Path\nclass A:\n def g(self, root): return Path(str(root))", [("A.g", "str(root)",
                                                                                          "flagged")]),
    # local by construction: temp dirs, local_* / tmp_* names, storage.local_path, no path-like word at all
    ("from pathlib import Path\nimport tempfile\ndef f(): return Path(tempfile.mkdtemp())", []),
    ("from pathlib import Path\ndef f(local, tmp_dir): return Path(local) / Path(str(tmp_dir))", []),
    ("from pathlib import Path\ndef f(p): return Path(storage.local_path(p))", []),
    ("from pathlib import Path\ndef f(spec): return Path(spec.origin).parent", []),
    ("from pathlib import Path\ndef f(local, cfg): return Path(local + cfg.data.eval)", [("f", "local + cfg.data.eval",
                                                                                        "forbidden")]),
    ("def f(path): return Path(path)", []),  # not pathlib's Path (not imported here)
])
def test_the_rule_itself(source, expected):
    assert offenders(source) == expected


def test_the_package_is_scanned():
    """The scan sees the package (a wrong root would pass every check vacuously)."""
    assert PACKAGE.is_dir() and len(list(PACKAGE.rglob("*.py"))) > 40
    assert ("config.py", "load_raw", "name_or_path") in _package_offenders()
    assert os.path.basename(str(PACKAGE)) == "reclip_ray"
