"""Threads of the agent: ``at_once`` runs independent calls of one boot step side by side;
``lower_thread_priority`` makes a background thread yield the cores to the servers."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A background thread's nice value: the CFS scheduler gives it about a tenth of a core's share when the
# servers' threads want the cores (sched(7), "The nice value"), and all the idle time otherwise.
BACKGROUND_NICE = 10


def at_once(calls: Mapping[str, Callable[[], object]]) -> dict[str, BaseException]:
    """Run every call in its own thread and wait for all; what the failed ones raised, by name."""
    failures: dict[str, BaseException] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller's thread
            failures[name] = exc

    threads = [threading.Thread(target=run, args=item, name=f"step-{item[0]}", daemon=True) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def results_at_once(calls: Mapping[str, Callable[[], T]]) -> dict[str, T]:
    """Run every call in its own thread; their results by name, or the first failure in the calls' order."""
    results: dict[str, T] = {}

    def keep(name: str, call: Callable[[], T]) -> None:
        results[name] = call()

    failures = at_once({name: partial(keep, name, call) for name, call in calls.items()})
    for name in calls:
        if name in failures:
            raise failures[name]
    return results


def preload(*modules: str, name: str, background: bool = False) -> None:
    """Import ``modules`` in a daemon thread named ``name`` (at a background priority if ``background``), so they
    load while the caller waits for something else. An import error is left for where the module is imported
    again, and says there what is missing."""

    def load() -> None:
        if background:
            lower_thread_priority()
        for module in modules:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)

    threading.Thread(target=load, name=name, daemon=True).start()


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> None:
    """Give the calling thread (only it: on Linux a nice value belongs to a thread, setpriority(2) with its
    thread id) the nice value ``nice``. Best effort: where that is refused, it just runs at the usual priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        logger.debug("could not lower this thread's priority: %s", exc)
