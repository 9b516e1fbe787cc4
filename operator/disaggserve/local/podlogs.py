"""Local pod logs: one file per pod, every (re)start of its process opened by a marker line.

The node agent appends each run of a pod's process to `<namespace>_<pod>.log`; the local API
serves `pods/log` from it (the current run, or `--previous`), and `disaggserve up` shows the
last line a crashing process wrote. Pure file handling, shared by both.
"""

from __future__ import annotations

from pathlib import Path

RUN_MARKER = "--- disaggserve-agent: process started "


def start_line(timestamp: str, argv: list[str]) -> str:
    """The marker the agent writes before each run of a pod's process."""
    return f"{RUN_MARKER}{timestamp}: {' '.join(argv)}\n"


def runs(text: str) -> list[str]:
    """The output of each run, oldest first, without the marker lines."""
    out: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(RUN_MARKER):
            out.append([])
        elif out:
            out[-1].append(line)
        else:  # output before any marker (a file written by hand): its own run
            out.append([line])
    return ["".join(lines) for lines in out]


def read_log(path: Path | None, *, previous: bool = False, tail_lines: int | None = None) -> tuple[str | None, int]:
    """(the current or previous run's output, or None when there is none; the file's size)."""
    if path is None:
        return None, 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, 0
    all_runs = runs(data.decode(errors="replace"))
    index = -2 if previous else -1
    if len(all_runs) < abs(index):
        return None, len(data)
    text = all_runs[index]
    if tail_lines is not None and tail_lines >= 0:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[len(lines) - tail_lines :] if tail_lines else [])
    return text, len(data)


def last_line(path: Path, *, previous: bool = False) -> str | None:
    """The last non-empty line a run wrote (why it crashed, most of the time), or None."""
    text, _ = read_log(path, previous=previous)
    for line in reversed((text or "").splitlines()):
        if line.strip():
            return line.strip()
    return None
