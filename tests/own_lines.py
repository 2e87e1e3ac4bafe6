"""What mmvq itself wrote to stderr, without the lines Ray forwards from its own processes.

A test in a process that holds an in-process Ray (the session's ``ray_local``, or one left by an
earlier test) can capture a line that Ray's log monitor prints at any moment, such as
``(pid=gcs_server) ... Failed to kill actor``. Tests that count mmvq's error lines count these.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray prefixes each forwarded line with its source in parentheses: "(pid=gcs_server)",
# "(raylet)", "(TrainWorker pid=123)", "(autoscaler +2s)".
_RAY_FORWARDED = re.compile(r"^\((?:[\w.:-]+ )?(?:pid=[\w.-]+|raylet|autoscaler[^)]*|gcs_server)\)")


def own_stderr_lines(err: str) -> list[str]:
    """``err.splitlines()`` without the lines Ray forwarded; every other line as it was, empty
    ones included (a test that counts lines still sees a forged newline)."""
    return [line for line in err.splitlines() if not _RAY_FORWARDED.match(_ANSI.sub("", line))]
