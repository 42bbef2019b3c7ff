"""A test-only fault hook (tests/faults), the same in every service; it does nothing unless its variable is set.

Each service calls its ``failpoint(request_id)`` right after a commit and before the publishes and the ack:

* ``crash_after_commit:<n>``: every n-th pass exits the process at once (``os._exit(137)``, as ``kill -9``
  would);
* ``raise_for:<request_id>``: every delivery of that request's events fails (a poison message).

The variable (``BATON_<SERVICE>_FAILPOINT``) is read once, at the first pass; unset is the default
everywhere but the fault tests.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os


class Failpoint:
    def __init__(self, variable: str, log: logging.Logger) -> None:
        self.variable = variable
        self.log = log
        self._passes = itertools.count(1)

    @functools.cached_property
    def spec(self) -> tuple[str, str]:
        kind, _, arg = os.environ.get(self.variable, "").partition(":")
        return kind, arg

    def __call__(self, request_id: str) -> None:
        kind, arg = self.spec
        if kind == "crash_after_commit" and next(self._passes) % max(int(arg), 1) == 0:
            self.log.warning("failpoint crash_after_commit: exiting after the commit, before the ack")
            logging.shutdown()
            os._exit(137)
        if kind == "raise_for" and request_id == arg:
            raise RuntimeError(f"failpoint raise_for: poison request {request_id}")
