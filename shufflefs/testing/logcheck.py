"""A pytest plugin: a test fails when the code under test logs an error it did not declare
(S3QL's idea, tests/pytest_checklogs.py there). Loaded by tests/conftest.py."""

from __future__ import annotations

import logging
import re

import pytest


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_logged_errors(*patterns): errors the code under test may log "
        "(regular expressions searched in the message); any other fails the test",
    )


class _ErrorRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("shufflefs"):
            self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_logged_errors(request):
    """A test fails when the code under test (in this process) logs an error it did not
    expect (`@pytest.mark.allow_logged_errors(pattern, ...)`): a bug that the core turns into
    EIO, on a path where the test expects an error anyway, must not pass unseen. Daemons in
    subprocesses: shufflefs.testing.mounting.Mount checks their logs."""
    handler = _ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    marker = request.node.get_closest_marker("allow_logged_errors")
    allowed = [re.compile(pattern) for pattern in (marker.args if marker else ())]
    unexpected = [
        record for record in handler.records if not any(pattern.search(record.getMessage()) for pattern in allowed)
    ]
    if unexpected:
        shown = "\n".join(
            f"{record.levelname} {record.name}: {record.getMessage()}"
            + (" (with a traceback)" if record.exc_info else "")
            for record in unexpected[:10]
        )
        pytest.fail(f"the code under test logged {len(unexpected)} unexpected errors:\n{shown}", pytrace=False)
