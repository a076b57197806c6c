"""A Trainer run that a test stops with a real signal, then resumes: ``signal_worker.py run|resume OUT``.

It prints ``step <n>`` after each batch (paced, so that a signal arrives mid-run) and, when fit
returns, writes the final weights to OUT/final.safetensors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import save_file  # noqa: E402
from trainer_setup import make_trainer  # noqa: E402

from trainer.callbacks import Callback  # noqa: E402


class Pace(Callback):
    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        sys.stdout.write(f"step {trainer.global_step}\n")
        sys.stdout.flush()
        time.sleep(0.05)


mode, out = sys.argv[1], Path(sys.argv[2])
trainer = make_trainer(out, trackers=["csv"], callbacks=[Pace()])
trainer.fit(resume="latest" if mode == "resume" else None)
save_file({k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()},
          str(out / "final.safetensors"))
sys.stdout.write("done\n")
