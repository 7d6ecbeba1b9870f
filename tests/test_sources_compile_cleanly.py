"""Every Python file of the project compiles without a warning, on this interpreter and the lent GPU machine's.

An invalid escape sequence in a string literal (a regex's ``\\s`` quoted in a docstring) is a silent
DeprecationWarning on Python 3.11, where the suite runs, and a SyntaxWarning that Python 3.12 (the device's) prints
at every fresh compile of the module, so it showed only there (``reclip_ray/data/tokenizer.py``, found running the
suite on the device's Python and torch: BENCHMARKS.md, issue 26). Turned into errors here, it fails on 3.11 too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("reclip_ray", "tests", "benchmarks", "jobs")


def test_every_source_file_compiles_without_a_warning():
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50  # the project's sources, not an empty glob
    failed = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a compile-time warning becomes a SyntaxError naming its line
            try:
                compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)
            except SyntaxError as exc:
                failed.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert failed == []
