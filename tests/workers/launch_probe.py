"""A script for `trainer launch` tests: reports what the launched processes see, fails or dies on request."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checks import leave  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from trainer_setup import make_trainer  # noqa: E402

from callbacks import Callback, ModelCheckpoint  # noqa: E402
from trainer import Accelerator, PartialState  # noqa: E402


class DieOnce(Callback):
    """SIGKILL this process at one batch, on the first attempt only (the launcher counts restarts)."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch, self.seen = rank, batch, 0

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.seen += 1
        first_attempt = os.environ.get("TRAINER_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.accelerator.process_index == self.rank and self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--trainer", type=Path, help="train the shared setup, results in this folder")
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-at", type=int)
    args = parser.parse_args()
    if args.trainer:
        callbacks = [ModelCheckpoint(every_n_steps=1, save_top_k=2)]
        if args.kill_rank is not None:
            callbacks.insert(0, DieOnce(args.kill_rank, args.kill_at))
        trainer = make_trainer(args.trainer, callbacks=callbacks, max_epochs=2)
        trainer.fit(resume="latest")
        if trainer.is_main_process:
            weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
            save_file({k: v.contiguous() for k, v in weights.items()}, str(args.trainer / "result.safetensors"))
        return
    accelerator = Accelerator()
    state = PartialState()
    # One write per line: the two ranks share the pipe, and print() writes the newline separately.
    sys.stdout.write(f"PROBE rank={state.process_index} world={state.num_processes} strategy={accelerator.strategy.name} "
                     f"precision={accelerator.mixed_precision} device={accelerator.device.type} "
                     f"accumulate={accelerator.gradient_accumulation_steps}\n")
    sys.stdout.flush()
    if args.fail_rank is not None:
        if state.process_index == args.fail_rank:
            raise RuntimeError(f"rank {args.fail_rank} fails on purpose")
        state.wait_for_everyone()  # the healthy rank waits for one that will never come


if __name__ == "__main__":
    main()
    leave()
