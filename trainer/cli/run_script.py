"""Run a training script as ``python script.py`` (or ``python -m module``) would, for one process of a launch.

``trainer launch`` starts each process of a multi-process launch as
``python run_script.py script.py args...`` (this file by its path, so nothing is imported
before the script). The script runs as ``__main__`` with its own ``sys.argv`` and
``sys.path[0]``; if it raises, its traceback goes to stderr as usual and is also written to the
error file torchrun gives each process (``TORCHELASTIC_ERROR_FILE``), through torch's own
``ErrorHandler``, which is what ``@record`` does. The launch's summary then names the file.
"""

from __future__ import annotations

import os
import runpy
import sys
from types import TracebackType


def _script_frames(traceback: TracebackType | None) -> TracebackType | None:
    """The traceback from the script's first frame on: without this file's and runpy's frames."""
    here = os.path.abspath(__file__)
    while traceback is not None:
        name = traceback.tb_frame.f_code.co_filename
        if os.path.abspath(name) != here and "runpy" not in name:
            break
        traceback = traceback.tb_next
    return traceback


def _record(error: BaseException) -> None:
    """Write the exception into this process's error file, in torch's format."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
    except Exception:  # the traceback is on stderr either way
        pass


def main(argv: list[str]) -> None:
    """Run ``script [args]`` or ``-m module [args]`` as the main module."""
    # Restarts on several machines are torchrun's own (TORCHELASTIC_RESTART_COUNT); on one machine each is a
    # fresh torchrun that trainer launch counts: the sum is this process's restart, either way.
    restarts = sum(int(os.environ.get(name) or 0) for name in ("TRAINER_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))
    os.environ["TRAINER_RESTART_COUNT"] = str(restarts)
    if argv[:1] == ["-m"]:
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]
        sys.path[0] = os.getcwd()  # as python -m does
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script, args = argv[0], argv[1:]
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.realpath(script))  # as python script.py does
        run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
    try:
        run()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as error:
        error.with_traceback(_script_frames(error.__traceback__))
        _record(error)
        sys.excepthook(type(error), error, error.__traceback__)
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
