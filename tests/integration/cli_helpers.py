"""``celery -A celery_app.worker msg ...`` run for real, for the CLI tests of every topology."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from celery_helpers import INTEGRATION_DIR, REPO_ROOT, Stack

#: The venv's own ``celery`` script (next to the interpreter running the tests).
CELERY = Path(sys.executable).with_name("celery")
#: Seconds one CLI call may take (it imports Celery and the app, then does a few round trips).
CLI_TIMEOUT = 60.0


class CLI:
    """Runs ``celery -A celery_app.worker msg ...`` with the environment a worker of ``stack``
    gets (see :meth:`celery_helpers.Worker.start`)."""

    def __init__(self, stack: Stack) -> None:
        pythonpath = [str(REPO_ROOT), str(INTEGRATION_DIR)]
        if os.environ.get("PYTHONPATH"):
            pythonpath.append(os.environ["PYTHONPATH"])
        self.env = {
            **os.environ,
            **stack.environ,
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
            # rich folds cells to the terminal width: keep task ids on one line.
            "COLUMNS": "250",
        }

    def __call__(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(CELERY), "-A", "celery_app.worker", "msg", *args]
        return subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=self.env,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )

    def ok(self, *args: str, input: str | None = None) -> str:
        """Run; assert exit code 0; return stdout."""
        done = self(*args, input=input)
        assert done.returncode == 0, explain(done)
        return done.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


def explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
