"""One scratch folder per benchmark run: every temporary folder the benchmark and its child processes make goes
under it (TMPDIR), and it is removed when the benchmark ends, by error or Ctrl-C too. Workspaces with model copies
are hundreds of MB each; left in /tmp they fill the disk after a few runs.

    import scratch; scratch.use("bench-train-")        # first thing in the parent's main()
"""

from __future__ import annotations

import os
import tempfile

_held: list[tempfile.TemporaryDirectory] = []


def use(prefix: str) -> str:
    d = tempfile.TemporaryDirectory(prefix=prefix)
    _held.append(d)  # removed at interpreter exit
    os.environ["TMPDIR"] = tempfile.tempdir = d.name
    return d.name
