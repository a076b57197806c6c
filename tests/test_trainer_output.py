"""What a batch job's log shows: plain progress lines without a terminal, where a run resumed, why it stopped early."""

from __future__ import annotations

import re

from trainer_setup import make_trainer

from trainer import PartialState
from trainer.callbacks import EarlyStopping, ProgressBar


def test_plain_lines_without_a_terminal(tmp_path, capsys):
    trainer = make_trainer(tmp_path, accumulate=1, max_epochs=2, log_every_n_steps=1, checkpoint=False,
                           callbacks=[ProgressBar(line_every_n_steps=4)])
    trainer.fit()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["epoch 0", "step 4"], ["epoch 0", "step 8"], ["epoch 0 done", "step 9"],
        ["epoch 1", "step 12"], ["epoch 1", "step 16"], ["epoch 1 done", "step 18"]]
    assert re.search(r"loss \d\.\d{4} \| lr \d\.\d{2}e-\d\d \| [\d.]+ steps/s", lines[0])
    assert "val_loss" in lines[2] and "val_acc" in lines[2]


def test_resuming_says_from_where(tmp_path, capsys):
    make_trainer(tmp_path, max_epochs=1).fit()
    PartialState._reset_state()
    capsys.readouterr()
    make_trainer(tmp_path, max_epochs=2).fit(resume="latest")
    out = capsys.readouterr().out
    assert f"Resumed from {tmp_path / 'checkpoints' / 'epoch=0-step=5'}: step 5, epoch 1, batch 0 of it." in out


def test_early_stopping_says_why(tmp_path, capsys):
    trainer = make_trainer(tmp_path, max_epochs=30, callbacks=[EarlyStopping(monitor="val_loss", patience=1,
                                                                              min_delta=10.0)])
    trainer.fit()
    out = capsys.readouterr().out
    assert re.search(r"EarlyStopping stopped training at step 5: val_loss 1 validation\(s\) without improving on "
                     r"[\d.]+ \(patience 1, min_delta 10, mode 'min'\); last [\d.]+\.", out), out
