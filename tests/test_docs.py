"""The documentation's configuration page is generated from the schema in trainer/config.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import trainer.config as launch_config
import trainer.precision.names as precision_names

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(table: str, key: str) -> str:
    return next(line for line in table.splitlines() if f"`{key}`" in line.split("|")[1])


def test_config_page_lists_every_key_with_its_default():
    table = _hooks().config_table()
    for name, key in launch_config.top_keys().items():
        assert f"`{name}`" in table
        for sub in key.section or {}:
            assert f"`{name}.{sub}`" in table
    assert "| `LOCAL_MACHINE` |" in _row(table, "compute_environment")
    assert "| `static` |" in _row(table, "rdzv_backend")
    assert "`bf16`" in _row(table, "mixed_precision")  # an allowed value


def test_changing_a_default_in_the_code_changes_the_page(monkeypatch):
    hooks = _hooks()
    assert "| `1` |" in _row(hooks.config_table(), "num_processes")
    monkeypatch.setitem(launch_config.DEFAULTS, "num_processes", 8)
    monkeypatch.setattr(precision_names, "PRECISIONS", tuple(p for p in precision_names.PRECISIONS if p.name in ("no", "bf16")))
    table = hooks.config_table()
    assert "| `8` |" in _row(table, "num_processes")
    assert "`fp16`" not in _row(table, "mixed_precision")


def test_error_index_holds_the_messages_in_the_code():
    index = _hooks().error_index()
    assert "Unknown key {path!r}." in index
    assert "fit() needs train_data: pass it to the Trainer." in index


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs not installed")
def test_built_configuration_page_follows_the_schema(tmp_path):
    """Build the real site (strict) and find the schema's defaults on the configuration page."""
    build = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout + build.stderr
    html = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert 'id="rdzv-backend"' in html and "<code>LOCAL_MACHINE</code>" in html
    assert "generated: config-keys" not in html


def test_troubleshooting_lists_every_fault_case():
    """Each case of the fault catalogue (every test in tests/test_faults_*.py) has its row in troubleshooting.md."""
    files = sorted(str(path) for path in (ROOT / "tests").glob("test_faults_*.py"))
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                               capture_output=True, text=True, cwd=ROOT, timeout=300)
    cases = [line.split("::", 1)[1] for line in collected.stdout.splitlines() if "::" in line]
    assert collected.returncode == 0, collected.stdout + collected.stderr
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    missing = [case for case in cases if f"| `{case}` |" not in page]
    assert not missing, f"troubleshooting.md has no row for {missing}"
    assert len(cases) >= 80, f"the fault catalogue holds {len(cases)} cases"
