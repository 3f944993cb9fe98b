"""The agent's threads: independent calls side by side, a background priority for one thread only."""

from __future__ import annotations

import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from kafka_asg.agent.concurrency import BACKGROUND_NICE, at_once, lower_thread_priority, preload, results_at_once


def test_calls_run_side_by_side_and_failures_come_back_by_name() -> None:
    barrier = threading.Barrier(3, timeout=5)  # only passes if all three run at the same time

    def meet(name: str) -> str:
        barrier.wait()
        if name == "b":
            raise ValueError("b failed")
        return name.upper()

    failures = at_once({n: partial(meet, n) for n in "abc"})
    assert list(failures) == ["b"] and str(failures["b"]) == "b failed"


def test_results_come_back_by_name_or_the_first_failure_in_order() -> None:
    assert results_at_once({"x": lambda: 1, "y": lambda: 2}) == {"x": 1, "y": 2}

    def fail(what: str) -> int:
        raise KeyError(what)

    with pytest.raises(KeyError, match="first"):
        results_at_once({"ok": lambda: 0, "one": lambda: fail("first"), "two": lambda: fail("second")})


def test_a_lower_priority_is_the_calling_threads_only() -> None:
    seen: dict[str, int] = {}

    def background() -> None:
        lower_thread_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=background)
    worker.start()
    worker.join()
    assert seen["thread"] == max(before, BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_preload_imports_in_a_thread_and_leaves_import_errors_for_later(tmp_path: Path) -> None:
    name = "kafka_asg_preload_probe"
    sys.modules.pop(name, None)
    module_dir = str(tmp_path)
    (tmp_path / f"{name}.py").write_text("LOADED = True\n")
    sys.path.insert(0, module_dir)
    try:
        preload("kafka_asg_no_such_module", name, name="test-preload", background=True)
        deadline = time.monotonic() + 5
        while name not in sys.modules and time.monotonic() < deadline:
            time.sleep(0.01)
        assert getattr(sys.modules[name], "LOADED", False)
    finally:
        sys.path.remove(module_dir)
        sys.modules.pop(name, None)
