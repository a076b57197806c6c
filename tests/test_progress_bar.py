"""The progress bar as a terminal shows it: one line per epoch, no stray validation lines."""

from __future__ import annotations

import pyte
import torch
from torch.utils.data import TensorDataset
from trainer_setup import make_trainer

from callbacks import ProgressBar


def screen_of(text: str, columns: int = 160, lines: int = 12) -> list[str]:
    """What a terminal displays after receiving ``text`` (carriage returns and cursor moves applied)."""
    screen = pyte.Screen(columns, lines)
    stream = pyte.Stream(screen)
    stream.feed(text.replace("\n", "\r\n"))
    return [line.rstrip() for line in screen.display if line.strip()]


def test_training_bar_with_a_nested_validation_bar_leaves_one_line_per_epoch(tmp_path, capsys):
    bar = ProgressBar(refresh_every_n_steps=1, enabled=True)
    trainer = make_trainer(tmp_path, max_epochs=2, eval_every_n_steps=2, callbacks=[bar], progress_bar=True,
                           eval_data=TensorDataset(torch.randn(12, 6), torch.randint(0, 3, (12,))))
    trainer.fit()
    shown = screen_of(capsys.readouterr().err)
    assert len(shown) == 2, shown
    for epoch, line in enumerate(shown):
        assert line.startswith(f"epoch {epoch}: 100%"), line
        assert "9/9" in line and "it/s" in line and "loss=" in line and "lr=" in line and "val_loss=" in line, line
    assert not any("validating" in line for line in shown)


def test_plain_lines_not_bars_when_not_a_terminal(tmp_path, capsys):
    make_trainer(tmp_path, max_epochs=1, progress_bar=True).fit()  # stderr is captured: not a TTY
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0].startswith("epoch 0 done | step 5 | ")  # one line per epoch
    make_trainer(tmp_path / "quiet", max_epochs=1, callbacks=[ProgressBar(enabled=False)]).fit()
    assert capsys.readouterr().err == ""
