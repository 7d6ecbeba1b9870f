"""Reading the errors a training run ends with: Ray wraps a worker's error several times; the user wants one line."""

from __future__ import annotations

import re


def root_message(exc: BaseException) -> str:
    """The line of a (Ray-wrapped) exception chain that says what went wrong.

    Ray wraps a worker's error several times and appends advice; the useful line is the innermost
    "SomeError: message", and our own errors (written to be read) are preferred and shown without their type.
    """
    # Breadth-first through causes and the per-rank failures Ray Train keeps (its own message holds only a snippet
    # of each worker's traceback); deepest last.
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if e in chain:
            continue
        chain.append(e)
        nested = [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                  *(getattr(e, "worker_failures", None) or {}).values()]
        todo += [n for n in nested if isinstance(n, BaseException)]
    pattern = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
    ours = ("DataError", "ConfigError", "CheckpointError", "ReclipError")
    candidates: list[tuple[str, str]] = []
    for e in reversed(chain):  # innermost first
        for line in reversed([ln.strip() for ln in str(e).splitlines() if ln.strip()]):
            m = pattern.match(line)
            if m and not line.startswith("ray.exceptions."):
                candidates.append(m.groups())
    for kind, text in candidates:
        if kind in ours:
            return text
    if candidates:
        return f"{candidates[0][0]}: {candidates[0][1]}"
    lines = [ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()]
    return lines[-1] if lines else type(chain[-1]).__name__
