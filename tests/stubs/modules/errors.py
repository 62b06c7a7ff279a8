"""Fake of ``modules/errors.py``: error reporting that prints to stderr and keeps records.

``report`` is what every WebUI hook wrapper calls when a script or callback raises; tests can
inspect ``exception_records`` (the real module keeps the last five as well).
"""
from __future__ import annotations

import sys
import textwrap
import traceback

exception_records: list[dict] = []


def format_traceback(tb) -> list[list[str]]:
    return [[f"{frame.filename}, line {frame.lineno}, {frame.name}", frame.line] for frame in traceback.extract_tb(tb)]


def format_exception(e: BaseException, tb) -> dict:
    return {"exception": str(e), "traceback": format_traceback(tb)}


def get_exceptions() -> list[dict]:
    return list(reversed(exception_records))


def record_exception() -> None:
    """Remember the exception being handled (if any); keeps the last five."""
    _, e, tb = sys.exc_info()
    if e is None:
        return
    if exception_records and exception_records[-1]["exception"] == str(e):
        return
    exception_records.append(format_exception(e, tb))
    if len(exception_records) > 5:
        exception_records.pop(0)


def report(message: str, *, exc_info: bool = False) -> None:
    """Print ``message`` to stderr with ``***`` prefixes, plus the current traceback if asked."""
    record_exception()
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


def print_error_explanation(message: str) -> None:
    record_exception()
    lines = message.strip().split("\n")
    width = max(len(x) for x in lines)
    print("=" * width, file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    print("=" * width, file=sys.stderr)


def display(e: Exception, task, *, full_traceback: bool = False) -> None:
    record_exception()
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    te = traceback.TracebackException.from_exception(e)
    if full_traceback:
        te.stack = traceback.StackSummary(traceback.extract_stack()[:-2] + te.stack)
    print(*te.format(), sep="", file=sys.stderr)


already_displayed: dict[str, int] = {}


def display_once(e: Exception, task) -> None:
    record_exception()
    if task in already_displayed:
        return
    display(e, task)
    already_displayed[task] = 1


def run(code, task) -> None:
    try:
        code()
    except Exception as e:
        display(e, task)
