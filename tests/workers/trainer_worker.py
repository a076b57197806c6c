"""Trains the shared small setup in its own process; can kill itself to test crash recovery."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from safetensors.torch import save_file  # noqa: E402
from trainer_setup import make_trainer  # noqa: E402

from callbacks import Callback, ModelCheckpoint  # noqa: E402


class KillAt(Callback):
    def __init__(self, batch: int | None, save: int | None) -> None:
        self.batch, self.save, self.batches, self.saves = batch, save, 0, 0

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.batches += 1
        if self.batches == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, checkpoint_dir):
        self.saves += 1
        if self.saves == self.save:  # everything is written to the scratch folder, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)


class ReportResume(Callback):
    def on_load_checkpoint(self, trainer, checkpoint_dir):
        print(f"resumed at step {trainer.global_step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--kill-at-batch", type=int)
    parser.add_argument("--kill-during-save", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    callbacks = [KillAt(args.kill_at_batch, args.kill_during_save), ReportResume(),
                 ModelCheckpoint(every_n_steps=1, save_top_k=2)]
    trainer = make_trainer(args.output_dir, init_seed=0 if args.resume is None else 5, callbacks=callbacks)
    trainer.fit(resume=args.resume)
    if args.result:
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.result))


if __name__ == "__main__":
    main()
