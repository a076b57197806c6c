"""A Trainer run that a test stops with a real signal, then resumes: ``signal_worker.py run|resume OUT [SIGNAL] [--async-saves]``.

It prints ``step <n> rank <r> pid <p>`` after each batch (paced, so that a signal arrives mid-run)
and, when fit returns, process 0 writes the final weights to OUT/final.safetensors. Launched alone,
with torchrun, or as a SLURM batch job whose preemption signal is SIGNAL.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402
from trainer_setup import make_trainer  # noqa: E402

from trainer.callbacks import Callback, ModelCheckpoint  # noqa: E402


class Pace(Callback):
    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        sys.stdout.write(f"step {trainer.global_step} rank {trainer.accelerator.process_index} pid {os.getpid()}\n")
        sys.stdout.flush()
        time.sleep(0.05)


mode, out, options = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
preemption = next((option for option in options if not option.startswith("--")), None)
# --async-saves: a checkpoint at every step, written in the background while training goes on
saves = [ModelCheckpoint(every_n_steps=1, async_save=True)] if "--async-saves" in options else []
trainer = make_trainer(out, trackers=["csv"], callbacks=[Pace(), *saves], preemption_signal=preemption)
trainer.fit(resume="latest" if mode == "resume" else None)
if trainer.accelerator.is_main_process:
    save_file({k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()},
              str(out / "final.safetensors"))
sys.stdout.write("done\n")
