"""Fault catalogue: bad input to each ``trainer`` command is one line ``trainer <command>: <reason>`` and status 2.

Most cases call ``trainer.cli.main.main([...])`` in this process (stderr through capsys); the last
ones run the real command in a process of its own to show the exit status and that no traceback
is printed. Every message names the file, key or flag and the fix; files that were there stay.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from distributed_helpers import run_cli
from fault_helpers import assert_still_loads, saved_checkpoint

from trainer.cli.main import main

GOOD = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No saved default configuration, no SLURM, and the launch's TRAINER_* variables undone afterwards."""
    saved = dict(os.environ)
    monkeypatch.setenv("TRAINER_CONFIG_FILE", str(tmp_path / "no_default.yaml"))
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("print('the script ran')\n")
    return path


def failed(capsys, argv: list[str]) -> str:
    """Run ``trainer argv`` here; assert status 2 and one line on stderr, no traceback; return that line."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# -- the configuration file ----------------------------------------------------------------------------------------


def test_garbage_yaml_names_the_file_line_and_column(tmp_path, capsys):
    path = write(tmp_path, "garbage.yaml", "num_processes: 2\ndistributed_type: [\n  a: b\n")
    line = failed(capsys, ["config", "validate", str(path)])
    assert line.startswith(f"trainer config: {path}, line 4, column 1: expected ',' or ']'")
    assert "starts at line 2, column 19" in line and "fix the YAML there" in line


@pytest.mark.parametrize(("text", "key", "value", "line_number"), [
    ("distributed_type: NO\n", "distributed_type", "NO", 1),
    ("num_processes: 1\nmixed_precision: no\n", "mixed_precision", "no", 2),
    ("dynamo_config:\n  dynamo_backend: off\n", "dynamo_config.dynamo_backend", "off", 2),
], ids=["distributed_type-NO", "mixed_precision-no", "nested-dynamo_backend-off"])
def test_unquoted_yaml_boolean_where_text_is_expected(tmp_path, capsys, text, key, value, line_number):
    path = write(tmp_path, "config.yaml", text)
    line = failed(capsys, ["launch", "--config_file", str(path), "train.py"])
    assert f"trainer launch: {path}, line {line_number}: {key}: {value} is read as the boolean" in line
    assert f'quote it: {key.split(".")[-1]}: "{value}"' in line


@pytest.mark.parametrize(("text", "kind"), [("- MULTI_CPU\n- 2\n", "a list"), ("MULTI_CPU\n", "a single string")],
                         ids=["list", "scalar"])
def test_config_that_is_not_a_mapping(tmp_path, capsys, text, kind):
    path = write(tmp_path, "config.yaml", text)
    line = failed(capsys, ["config", "validate", str(path)])
    assert f"{path} holds {kind}, not a mapping of keys to values: write one `key: value` per line" in line


def test_config_that_is_not_utf8(tmp_path, capsys):
    path = write(tmp_path, "config.yaml", b"num_processes: 2\nuse_cpu: \xff\xfe\n")
    line = failed(capsys, ["config", "validate", str(path)])
    assert f"{path} is not UTF-8 text: byte 0xff at line 2, column 10" in line and "save the file as UTF-8" in line


def test_a_key_set_twice(tmp_path, capsys):
    path = write(tmp_path, "config.yaml", "num_processes: 2\nuse_cpu: true\nnum_processes: 4\n")
    line = failed(capsys, ["config", "validate", str(path)])
    assert f"{path}, line 3: num_processes is set twice (first at line 1)" in line and "keep one" in line


def test_json_config_with_a_syntax_error(tmp_path, capsys):
    path = write(tmp_path, "config.json", '{"num_processes": 2,\n}')
    line = failed(capsys, ["config", "validate", str(path)])
    assert f"{path}, line 2, column 1: Expecting property name" in line and "fix the JSON there" in line


def test_config_path_is_a_folder(tmp_path, capsys):
    line = failed(capsys, ["config", "validate", str(tmp_path)])
    assert f"{tmp_path} is a folder, not a config file; pass the YAML file itself" in line


def test_launch_with_a_missing_config_file(tmp_path, capsys, script):
    line = failed(capsys, ["launch", "--config_file", str(tmp_path / "nope.yaml"), str(script)])
    assert line == (f"trainer launch: No config file at {tmp_path / 'nope.yaml'}. Write one with `trainer config`, "
                    "or check the path.")


def test_config_validate_without_a_file(capsys):
    line = failed(capsys, ["config", "validate"])
    assert line == "trainer config: config validate needs the file to check: trainer config validate FILE."


def test_config_default_into_a_folder_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    line = failed(capsys, ["config", "default", "--cpu", "--config_file", str(folder)])
    assert f"{folder} is a folder; pass a file path for the configuration, e.g. {folder / 'default_config.yaml'}" in line
    assert list(folder.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled up once the test has put its files there."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill(folder: Path) -> None:
    """Write until the file system says it is full."""
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"x" * 4096)
    except OSError as error:
        assert error.strerror == "No space left on device"
    finally:
        os.close(descriptor)


def test_config_write_on_a_full_disk_keeps_the_old_file(full_disk, capsys):
    path = write(full_disk, "config.yaml", GOOD)
    fill(full_disk)
    line = failed(capsys, ["config", "default", "--cpu", "--config_file", str(path)])
    assert line == (f"trainer config: Cannot write the configuration to {path}: No space left on device; "
                    "pass another --config_file.")
    assert path.read_text() == GOOD
    assert sorted(p.name for p in full_disk.iterdir()) == ["config.yaml", "filler"]


# -- the command line ------------------------------------------------------------------------------------------------


def test_unknown_command_suggests_the_closest(capsys):
    line = failed(capsys, ["lanch", "train.py"])
    assert line.startswith("trainer: argument <command>: 'lanch' is not one of config, env, estimate-memory, fit, launch")
    assert line.endswith("Did you mean 'launch'? See `trainer --help`.")


def test_a_bad_flag_value_is_one_line_without_the_usage(capsys):
    line = failed(capsys, ["launch", "--num_processes", "two", "train.py"])
    assert line == ("trainer launch: argument --num_processes/--num-processes: invalid int value: 'two'. "
                    "See `trainer launch --help`.")


def test_a_misspelt_flag_suggests_the_closest(capsys, script):
    line = failed(capsys, ["launch", "--num_proceses", "2", str(script)])
    assert line == ("trainer launch: unrecognized arguments: --num_proceses; did you mean --num_processes? "
                    "See `trainer launch --help`.")


@pytest.mark.parametrize("kind", ["missing-file", "folder", "missing-module"])
def test_a_script_that_is_not_there(tmp_path, capsys, kind):
    argv = {"missing-file": [str(tmp_path / "trian.py")], "folder": [str(tmp_path)],
            "missing-module": ["-m", "no_such_pkg.train"]}
    line = failed(capsys, ["launch", "--num_processes", "2", "--cpu", *argv[kind]])
    expected = {"missing-file": f"No script at {tmp_path / 'trian.py'}; check the path",
                "folder": f"{tmp_path} is a folder, not a script; pass the .py file to run",
                "missing-module": "No module named 'no_such_pkg' (for -m no_such_pkg.train)"}[kind]
    assert line.startswith(f"trainer launch: {expected}")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--num_machines", "2", "--machine_rank", "2", "--main_process_ip", "10.0.0.1", "--num_processes", "4"],
     "--machine_rank 2 does not fit --num_machines 2: give each machine its own rank from 0 to 1"),
    (["--num_machines", "2", "--main_process_ip", "10.0.0.1", "--num_processes", "3"],
     "--num_processes 3 is not a multiple of --num_machines 2: it counts the processes of all machines together"),
    (["--num_machines", "2", "--num_processes", "4"],
     "Several machines need --main_process_ip (the address of machine 0), the same on every machine."),
    (["--num_processes", "2", "--main_process_port", "70000"],
     "--main_process_port 70000 is not a port; use one from 1024 to 65535"),
    (["--num_machines", "2", "--main_process_ip", "10.0.0.1", "--num_processes", "4", "--max_restarts", "1"],
     "--max_restarts 1 does not work with the static rendezvous on several machines: torchrun's static rendezvous "
     "hands the restarted processes the addresses of the ones that died, and every machine hangs; pass --rdzv_backend c10d"),
], ids=["machine_rank", "not-a-multiple", "no-main-ip", "port-range", "static-restarts"])
def test_machine_layout_mistakes(capsys, script, flags, expected):
    line = failed(capsys, ["launch", "--cpu", *flags, str(script)])
    assert line.startswith(f"trainer launch: {expected}")


@pytest.mark.parametrize("machines", [1, 2], ids=["one-machine", "machine-0-of-2"])
def test_a_busy_port_is_named_before_any_process_starts(capsys, script, machines):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        flags = ["--num_processes", "4", "--num_machines", "2", "--main_process_ip", "127.0.0.1"] if machines == 2 else \
            ["--num_processes", "2"]
        line = failed(capsys, ["launch", "--cpu", *flags, "--main_process_port", str(port), str(script)])
    assert line.startswith(f"trainer launch: --main_process_port {port} is in use on this machine")
    assert "pass a free port with --main_process_port" in line


def test_srun_variables_without_a_job_step_warn(capsys, monkeypatch, script):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert main(["launch", "--cpu", str(script)]) == 0
    err = capsys.readouterr().err
    assert err.strip() == ("trainer launch: warning: SLURM_NTASKS=4 and SLURM_PROCID=2 are set but SLURM_STEP_ID is not, "
                           "so this is not a task of an srun job step: this starts one process, on its own, not one process "
                           "per SLURM task; to run one process per task, run `srun trainer launch ...` in the job script.")


# -- merge-weights and estimate-memory -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    return saved_checkpoint(tmp_path_factory.mktemp("full"))


def test_merge_weights_of_a_missing_checkpoint(tmp_path, capsys):
    line = failed(capsys, ["merge-weights", str(tmp_path / "checkpoint_3"), str(tmp_path / "merged")])
    assert line.startswith(f"trainer merge-weights: No checkpoint folder at {tmp_path / 'checkpoint_3'}; pass the checkpoint")
    assert not (tmp_path / "merged").exists()


def test_merge_weights_of_a_full_checkpoint_leaves_it_as_it_is(tmp_path, capsys, full_checkpoint):
    path, weights = full_checkpoint
    line = failed(capsys, ["merge-weights", str(path), str(tmp_path / "merged")])
    assert line.startswith(f"trainer merge-weights: {path} is not a sharded checkpoint")
    assert "already holds model.safetensors" in line
    assert_still_loads(path, weights)


def test_merge_weights_into_a_file(tmp_path, capsys, full_checkpoint):
    path, weights = full_checkpoint
    target = write(tmp_path, "merged", "not a folder")
    line = failed(capsys, ["merge-weights", str(path), str(target)])
    assert line == (f"trainer merge-weights: {target} is a file; pass a folder to write the weights into "
                    "(it is created if missing).")
    assert target.read_text() == "not a folder"
    assert_still_loads(path, weights)


def test_estimate_memory_of_a_missing_config_file(tmp_path, capsys):
    line = failed(capsys, ["estimate-memory", str(tmp_path / "config.json")])
    assert line == (f"trainer estimate-memory: No file or folder at {tmp_path / 'config.json'}; pass an existing model "
                    "folder or its config.json.")


# -- the real command, in a process of its own -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["garbage-yaml-launch", "yaml-boolean-test", "unknown-command", "missing-script"])
def test_the_command_exits_2_with_one_line_and_no_traceback(tmp_path, case):
    garbage = write(tmp_path, "bad.yaml", "num_processes: [2\n")
    boolean = write(tmp_path, "no.yaml", "distributed_type: NO\n")
    argv, expected = {
        "garbage-yaml-launch": (["launch", "--config_file", str(garbage), "train.py"],
                                f"trainer launch: {garbage}, line 2, column 1: expected ',' or ']'"),
        "yaml-boolean-test": (["test", "--config_file", str(boolean)],
                              f'trainer test: {boolean}, line 1: distributed_type: NO is read as the boolean false'),
        "unknown-command": (["tset"], "trainer: argument <command>: 'tset' is not one of"),
        "missing-script": (["launch", "--num_processes", "2", "--cpu", "trian.py"], "trainer launch: No script at trian.py"),
    }[case]
    code, out, err = run_cli(*argv, timeout=60)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err
    assert "Traceback" not in err
