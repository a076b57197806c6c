"""The DVCLive tracker: a real fit, read back from the files DVCLive writes, inside and outside Git repositories."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from tracker_helpers import csv_history
from trainer_setup import make_trainer

from callbacks.trackers import CSVTracker, DVCLiveTracker

pytest.importorskip("dvclive")
from PIL import Image  # noqa: E402  (a dvclive dependency)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """DVC's configuration and caches in tmp_path, no Studio, no analytics; nothing left running after a run."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(home / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(home / "dvc-system"))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(home / "dvc-site-cache"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
    for name in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_URL", "DVCLIVE_TEST", "DVCLIVE_RESUME", "DVC_ROOT",
                 "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME", "GIT_DIR", "GIT_WORK_TREE"):
        monkeypatch.delenv(name, raising=False)
    threads, children = set(threading.enumerate()), set(psutil.Process().children(recursive=True))
    yield
    assert set(threading.enumerate()) <= threads
    assert set(psutil.Process().children(recursive=True)) <= children


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=folder,
                          check=True, capture_output=True, text=True).stdout


def dvclive_series(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``plots/metrics/<name>.tsv`` DVCLive wrote: one row per logged value, ``step`` first."""
    series = {}
    root = directory / "plots" / "metrics"
    for path in sorted(root.rglob("*.tsv")):
        name = path.relative_to(root).with_suffix("").as_posix()
        with open(path, newline="") as file:
            series[name] = [(int(row["step"]), float(row[path.stem])) for row in csv.DictReader(file, delimiter="\t")]
    return series


def fit_and_compare(output: Path) -> Path:
    tracker = DVCLiveTracker(on_error="raise")
    make_trainer(output, trackers=[CSVTracker(), tracker], log_every_n_steps=2).fit()
    assert not tracker.failed
    directory = output / "dvclive"
    expected = csv_history(output)
    assert [step for step, _ in expected["train_loss"]] == [2, 4, 6, 8, 10, 12, 14]
    assert dvclive_series(directory) == expected  # same steps, same values, no extra rows

    summary = json.loads((directory / "metrics.json").read_text())
    assert summary == {"step": 15, **{name: points[-1][1] for name, points in expected.items()}}
    params = yaml.safe_load((directory / "params.yaml").read_text())
    assert params["batch_size"] == 4 and params["max_epochs"] == 3 and params["max_steps"] is None
    return directory


def test_fit_outside_git(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if shutil.which("git") and subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("the temporary folder is inside a Git repository")
    directory = fit_and_compare(tmp_path / "out")
    assert not (tmp_path / ".dvc").exists() and not (directory / "dvc.yaml").exists()


@needs_git
@pytest.mark.parametrize("commits", [True, False], ids=["with-commits", "empty-repository"])
def test_fit_inside_git_leaves_the_repository_alone(tmp_path, monkeypatch, commits):
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    if commits:
        (repo / "README").write_text("project\n")
        git(repo, "add", "README")
        git(repo, "commit", "-q", "-m", "start")
    monkeypatch.chdir(repo)
    status = git(repo, "status", "--porcelain", "--untracked-files=no")
    fit_and_compare(tmp_path / "out")
    assert not (repo / ".dvc").exists() and not (repo / ".dvcignore").exists()
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == status  # nothing staged


def test_images_artifacts_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = DVCLiveTracker(on_error="raise")
    first.start("proj", {"lr": 0.1, "model": {"width": 16}, "device": torch.device("cpu")}, tmp_path)
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    chw = np.random.default_rng(0).integers(0, 2, (3, 4, 5)).astype(np.float32)  # CxHxW floats in 0..1
    first.log_images({"rgb": rgb, "chw": chw, "grey": rgb[..., 0]}, step=1)
    first.log_images({"rgb": rgb[::-1].copy()}, step=2)
    first.log({"loss": 1.0, "note": "not a number"}, step=2)
    (tmp_path / "weights.txt").write_text("w")
    first.log_artifact(tmp_path / "weights.txt", name="weights.txt")
    state = first.state_dict()
    first.finish()

    directory = tmp_path / "dvclive"
    images = directory / "plots" / "images"
    np.testing.assert_array_equal(np.asarray(Image.open(images / "rgb" / "1.png")), rgb)  # PNG: lossless
    np.testing.assert_array_equal(np.asarray(Image.open(images / "rgb" / "2.png")), rgb[::-1])
    np.testing.assert_array_equal(np.asarray(Image.open(images / "chw" / "1.png")),
                                  chw.transpose(1, 2, 0).astype(np.uint8) * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(images / "grey" / "1.png")), rgb[..., 0])
    assert (directory / "artifacts" / "weights.txt").read_text() == "w"
    params = yaml.safe_load((directory / "params.yaml").read_text())
    assert params == {"lr": 0.1, "model": {"width": 16}, "device": "cpu"}

    second = DVCLiveTracker(on_error="raise")
    second.load_state_dict(state)  # a resumed fit: the same folder, appended to
    second.start("proj", {"lr": 0.1}, tmp_path)
    second.log({"loss": 0.5}, step=3)
    second.finish("failed")
    assert dvclive_series(directory) == {"loss": [(2, 1.0), (3, 0.5)]}
    assert json.loads((directory / "metrics.json").read_text()) == {"loss": 0.5, "step": 3}


@needs_git
@pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc.*")
def test_init_dvc_keeps_dvclive_default(tmp_path, monkeypatch):
    """``init_dvc=True``: DVCLive initialises DVC in the Git repository and caches artifacts with ``dvc add``."""
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # DVC's progress bars would start tqdm's shared monitor thread
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "README").write_text("project\n")
    git(repo, "add", "README")
    git(repo, "commit", "-q", "-m", "start")
    monkeypatch.chdir(repo)
    tracker = DVCLiveTracker(init_dvc=True, on_error="raise")
    tracker.start("proj", {"lr": 0.1}, repo / "out")
    tracker.log({"loss": 1.0}, step=1)
    (repo / "weights.txt").write_text("w")
    tracker.log_artifact(repo / "weights.txt")
    tracker.finish()
    assert (repo / ".dvc").is_dir() and (repo / "weights.txt.dvc").is_file()
    assert dvclive_series(repo / "out" / "dvclive") == {"loss": [(1, 1.0)]}
    assert (tmp_path / "home" / "dvc-site-cache").is_dir()  # DVC's site cache went where the test said, not /var/tmp
