"""A prepared scheduler follows Accelerate's semantics: a schedule sized from the unprepared loader ends with the data.

Upstream scripts size their schedules before ``prepare`` (``len(train_dataloader) * num_epochs``);
on N processes each process sees 1/N of the batches, and the prepared scheduler advances N times
per optimizer step, so the schedule reaches its end when the data does. The Trainer, which sizes
nothing from an unprepared loader, steps once per optimizer step and tells how many that is.
"""

from __future__ import annotations

import re

import torch
from distributed_helpers import WORKERS_DIR, run_cli
from trainer_setup import BATCH, ClassifierTrainer, datasets, model

SCRIPT = WORKERS_DIR / "schedule_worker.py"


def _final_rates(out: str) -> dict[int, float]:
    return {int(rank): float(lr) for rank, lr in re.findall(r"LR rank (\d): ([\d.]+)", out)}


def test_a_linear_schedule_ends_at_zero_on_one_and_on_two_processes():
    code, out, err = run_cli("launch", str(SCRIPT))
    assert code == 0, err
    assert _final_rates(out) == {0: 0.0}
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", str(SCRIPT))
    assert code == 0, err
    assert _final_rates(out) == {0: 0.0, 1: 0.0}  # one step per optimizer step would leave it at 0.05
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", str(SCRIPT), "2")  # accumulating 2
    assert code == 0, err
    assert _final_rates(out) == {0: 0.0, 1: 0.0}


class LinearDecay(ClassifierTrainer):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        total = self.estimated_stepping_batches  # sized in optimizer steps, as a Lightning module would
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))


def test_the_trainer_steps_its_schedule_once_per_optimizer_step(tmp_path):
    train, evaluation = datasets()
    trainer = LinearDecay(model(), train_data=train, eval_data=evaluation, batch_size=BATCH, max_epochs=2, accumulate=2,
                          output_dir=tmp_path, trackers=[], progress_bar=False, checkpoint=False)
    assert trainer.estimated_stepping_batches == 2 * 5  # 9 batches an epoch, groups of 2: the last one short
    trainer.fit()
    assert trainer.global_step == 10
    assert trainer.scheduler.get_last_lr() == [0.0]
