"""TensorBoard: a short fit's event files, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tracker_helpers import csv_history
from trainer_setup import make_trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from callbacks import TensorBoardTracker  # noqa: E402


def read(directory):
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_fit_is_read_back_from_the_event_files(tmp_path):
    trainer = make_trainer(tmp_path, trackers=["csv", TensorBoardTracker()], log_every_n_steps=2, run_name="r1")
    trainer.fit()
    events = read(tmp_path / "tensorboard" / "trainer" / "r1")
    expected = csv_history(tmp_path)
    assert set(events.Tags()["scalars"]) == {"train_loss", "val_loss", "val_acc"}
    for name, history in expected.items():
        # event files hold float32
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(s, np.float32(v).item()) for s, v in history]
    text = events.Tensors("run_config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.strip("`\n"))
    assert config["batch_size"] == 4 and config["max_epochs"] == 3


def test_images_and_tables(tmp_path):
    tracker = TensorBoardTracker(logging_dir=tmp_path)
    tracker.start("media")
    image = torch.zeros(3, 4, 5)
    image[1] = 1.0  # green, channels first
    tracker.log_images({"sample": image}, step=3)
    tracker.log_table("predictions", columns=["x", "y"], data=[[1, 2]], step=3)
    tracker.finish()
    events = read(tmp_path / "tensorboard" / "media")
    (picture,) = events.Images("sample")
    assert picture.step == 3 and (picture.width, picture.height) == (5, 4)
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(picture.encoded_image_string)))
    assert pixels.shape == (4, 5, 3) and (pixels[..., 1] == 255).all() and (pixels[..., 0] == 0).all()
    table = events.Tensors("predictions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| x | y |" in table and "| 1 | 2 |" in table
