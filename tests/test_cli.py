"""Every command the docs show parses: each ``reclip-ray ...`` line of README.md, BENCHMARKS.md and RELIABILITY.md
(code blocks and inline code) and each ``python jobs/X.py ...`` line, through the job's own subcommand.

Nothing runs: the commands are given to ``cli.build_parser`` only, so a flag a subcommand lost (or a job script
pointing at a subcommand that is gone) fails here in milliseconds instead of in a user's terminal.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from reclip_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md", "RELIABILITY.md")


def _job_subcommand(script: str) -> str:
    """The subcommand a ``jobs/*.py`` wrapper hands its arguments to: ``run(["sweep", *sys.argv[1:]])``."""
    (sub,) = re.findall(r'run\(\["(\w+)", \*sys\.argv\[1:\]\]\)', (ROOT / script).read_text())
    return sub


def _code(text: str) -> list[tuple[str, bool]]:
    """(code, whole command?): the lines of fenced blocks, continuation lines (ending in a backslash) joined, are
    whole commands; inline code spans of the prose (which may wrap over lines) may be a synopsis
    (``reclip-ray plan [--config ...]``) or name a subcommand in passing (``reclip-ray eval``)."""
    lines, prose, inside, pending = [], [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            prose.append(line)
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append((pending, True))
        pending = ""
    return lines + [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", "\n".join(prose))]


def documented_commands() -> list[tuple[str, list[str], bool]]:
    """(where, argv for build_parser, whole command?) for every documented command."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for line, whole in _code(text):
            if "reclip-ray " not in line and "python jobs/" not in line:
                continue
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word == "reclip-ray" and i + 1 < len(words) and words[i + 1][0].isalpha():
                    found.append((f"{doc}: {line.strip()}", words[i + 1:], whole))
                    break
                if word == "python" and i + 1 < len(words) and words[i + 1].startswith("jobs/"):
                    found.append((f"{doc}: {line.strip()}", [_job_subcommand(words[i + 1]), *words[i + 2:]], whole))
                    break
    return found


def _help(where: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*argv, "--help"])
    out, err = capsys.readouterr()
    assert stop.value.code == 0, f"{where}: {err.strip().splitlines()[-1]}"  # 2: no such subcommand
    return out


def _parse(where: str, argv: list[str], capsys):
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {capsys.readouterr().err.strip().splitlines()[-1]}")


def test_the_docs_show_every_subcommand():
    """The extraction finds the commands it should (a pattern that matched nothing would make the test below
    vacuous)."""
    commands = documented_commands()
    shown = {argv[0] if argv[0] != "data" or len(argv) == 1 else f"data {argv[1]}" for _, argv, _ in commands}
    assert {"train", "sweep", "eval", "export", "report", "plan", "bench", "data synth", "data ingest", "data shrink",
            "data tokenizer", "data inspect"} <= shown, shown
    assert any(where.startswith("README.md: ray job submit") and argv[0] == "sweep" for where, argv, _ in commands)
    assert sum(whole for _, _, whole in commands) >= 15


@pytest.mark.parametrize("where, argv, whole", documented_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_documented_command_works(where, argv, whole, capsys):
    """A whole command parses as written; any mention names a subcommand that exists, and every ``--flag`` it
    shows is in that subcommand's ``--help`` (``bench``: the benchmark exists; its flags are its own module's)."""
    if argv[0] == "bench":
        for what in argv[1].split("|") if len(argv) > 1 else []:
            _parse(where, ["bench", what], capsys)
        return
    if whole:
        assert callable(_parse(where, argv, capsys).func)
    sub = argv[:2] if argv[0] == "data" and len(argv) > 1 else argv[:1]
    flags = {w.strip("[]").split("=")[0] for w in argv if w.lstrip("[").startswith("--")}
    shown = set(re.findall(r"--[a-z][a-z-]*", _help(where, sub, capsys)))
    assert flags <= shown, f"{where}: {sorted(flags - shown)} not in `reclip-ray {' '.join(sub)} --help`"
