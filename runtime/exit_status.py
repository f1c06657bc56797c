"""What `dilseg`'s exit status means, so scripts and service managers can tell the outcomes apart.

Signals follow the shell's 128 + N convention (systemd and supervisors read 143 as "stopped
by SIGTERM"); a live source that was given up on has its own status, so a service manager can
restart the job when the camera or server comes back.
"""

from __future__ import annotations

import signal

OK = 0
THRESHOLD_FAILED = 1  # `dilseg verify`: a --min-agreement / --max-miou-drop threshold failed
ERROR = 2  # bad input, a refused request, an output that could not be written: the message says which
SOURCE_LOST = 3  # a live source dropped and did not come back within the reopen attempts
SIGINT = 128 + signal.SIGINT  # 130: Ctrl-C
SIGTERM = 128 + signal.SIGTERM  # 143

BY_STOP = {"SIGINT": SIGINT, "SIGTERM": SIGTERM, "source lost": SOURCE_LOST}

HELP = f"""\
exit status:
  {OK}    done (every frame, or --max-frames, or q/Esc in the window)
  {THRESHOLD_FAILED}    verify: a threshold failed
  {ERROR}    error: bad input, a refused option, an output that could not be written (one line says
       which; outputs that were complete are kept and listed)
  {SOURCE_LOST}    a live source was lost (it did not come back within the reopen attempts); the
       outputs hold the frames before
  {SIGINT}  stopped by Ctrl-C (SIGINT); outputs finalised
  {SIGTERM}  stopped by SIGTERM; outputs finalised"""


def for_stop(stopped_by: str) -> int:
    """The exit status of a run that ended for ``stopped_by`` (PipelineStats.stopped_by)."""
    return BY_STOP.get(stopped_by, OK)
