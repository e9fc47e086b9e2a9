"""Options and ordering of the benchmark suite (bench/test_*.py).

- ``--bench-deadline-s S``: cases that start more than S seconds after pytest started are
  skipped as not measured (bench/report.py's time limit).
- torch.compile cases run last: each compiles for seconds, so a deadline cuts them first.
"""
from __future__ import annotations

import time

import pytest

_STARTED = pytest.StashKey[float]()


def pytest_addoption(parser):
    parser.addoption("--bench-deadline-s", type=float, default=None,
                     help="skip benchmark cases that would start after this many seconds")


def pytest_configure(config):
    config.stash[_STARTED] = time.monotonic()


def pytest_collection_modifyitems(config, items):
    def compiles(item) -> bool:
        callspec = getattr(item, "callspec", None)
        return callspec is not None and callspec.params.get("impl") == "compile"
    items.sort(key=compiles)  # stable: the order within each part is kept


@pytest.fixture(autouse=True)
def _bench_deadline(request):
    deadline = request.config.getoption("--bench-deadline-s")
    if deadline is not None and time.monotonic() - request.config.stash[_STARTED] > deadline:
        pytest.skip(f"not measured: --bench-deadline-s {deadline:.0f} had passed")
