"""Fake of ``modules/call_queue.py``: the global generation lock and the gradio call wrappers.

``queue_lock`` is a plain ``threading.Lock`` (the real one is a FIFO lock with the same
``with``-interface). ``wrap_gradio_gpu_call`` takes the lock, brackets the call with
``state.begin/end`` and progress bookkeeping; ``wrap_gradio_call`` resets interrupt/skip flags
afterwards and turns exceptions into ``extra_outputs + [error html]`` as the real one does.
"""
from __future__ import annotations

import html
import threading
import time
from functools import wraps
from typing import Any, Callable

from modules import errors, progress, shared

queue_lock = threading.Lock()


def wrap_queued_call(func: Callable) -> Callable:
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f


def wrap_gradio_gpu_call(func: Callable, extra_outputs: list | None = None) -> Callable:
    @wraps(func)
    def f(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func: Callable, extra_outputs: list | None = None, add_stats: bool = False) -> Callable:
    @wraps(func)
    def f(*args, **kwargs):
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res

    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(func: Callable, extra_outputs: list | None = None, add_stats: bool = False) -> Callable:
    @wraps(func)
    def f(*args, extra_outputs_array: list | None = extra_outputs, **kwargs) -> tuple[Any, ...]:
        started = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report(f"Error completing request\nArguments: {args} {kwargs}"[:131072], exc_info=True)
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            res = list(extra_outputs_array) + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        if not add_stats:
            return tuple(res)
        elapsed = time.perf_counter() - started
        if res and isinstance(res[-1], str):
            res[-1] += f"<div class='performance'><p class='time'>Time taken: <wbr><span class='measurement'>{elapsed:.1f} sec.</span></p></div>"
        return tuple(res)

    return f
