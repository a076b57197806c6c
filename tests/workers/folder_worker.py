"""Worker for the run-folder fault cases: hold an output folder's lock, or train in one on every process.

    folder_worker.py hold DIR       take DIR's run lock, print "held", sleep until killed
    folder_worker.py die DIR        take DIR's run lock, then SIGKILL this process (a crashed run)
    folder_worker.py fit DIR        a small Trainer fit in DIR on each process; print each rank's error
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

mode, folder = sys.argv[1], Path(sys.argv[2])
if mode in ("hold", "die"):
    from trainer.run_lock import RunLock

    RunLock(folder).acquire()
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdout.write("held\n")
    sys.stdout.flush()
    time.sleep(600)
else:
    from trainer_setup import make_trainer

    from trainer.run_lock import OutputDirLockedError

    trainer = make_trainer(folder, max_epochs=1, trackers=[])
    try:
        trainer.fit()
    except OutputDirLockedError as error:
        sys.stdout.write(f"rank {trainer.accelerator.process_index} refused: {error}\n")
        sys.stdout.flush()
        sys.exit(3)
    sys.stdout.write(f"rank {trainer.accelerator.process_index} trained {trainer.global_step}\n")
