"""Test-only fault injection: kill the process at a chosen point, as a power cut or ``kill -9``
would, so that tests can prove that no output is ever left half-written.

``DPN_JAX_FAULT_AFTER=<event>:<n>`` sends SIGKILL to this process at the ``n``-th occurrence of
``event`` (no handler runs, nothing is cleaned up). The events, each a :func:`point` call:

* ``batch``: a training dispatch was issued (``fit`` and sweeps), before its checkpoint if due;
* ``checkpoint``: a training checkpoint was written;
* ``chunk``: a chunk of output rows was written (``predict``; ``data prepare``'s encoding pass);
* ``rename``: an output (a file, a folder, a dataset cache) or an entry carried into a new folder
  is about to be put in place;
* ``installed``: an output folder or file took its target's place, before the old one is deleted.

Unset (always, outside tests), :func:`point` only compares a string.
"""

from __future__ import annotations

import os
import signal

ENV = "DPN_JAX_FAULT_AFTER"


def _parse(spec: str | None) -> tuple[str | None, int]:
    if not spec:
        return None, 0
    event, _, n = spec.partition(":")
    if not event or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{ENV}={spec!r}: expected <event>:<n>, e.g. batch:3 (a test-only setting)")
    return event, int(n)


_EVENT, _AT = _parse(os.environ.get(ENV))
_seen = 0


def point(event: str) -> None:
    """Count one ``event``; SIGKILL this process when it is the one ``DPN_JAX_FAULT_AFTER`` names."""
    global _seen
    if event != _EVENT:
        return
    _seen += 1
    if _seen == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
