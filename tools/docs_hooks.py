"""MkDocs hooks (``hooks:`` in mkdocs.yml): pages generated from the code at build time.

* ``configuration.md``: the ``<!-- generated: config-keys -->`` marker is replaced by a table of
  every key of the launch configuration with its help, read from ``trainer.config.top_keys()``:
  the launch's own keys there (``LAUNCH_KEYS``, ``DEFAULTS``), each strategy's section from the
  strategy's ``spec`` (a registered third-party strategy too), ``mixed_precision`` from the
  precision table. Change a key, its allowed values, its help or a default in the code and the
  page changes with it.
* ``trainer.md``: the ``<!-- generated: event-order -->`` marker is replaced by the loop written out
  as pseudocode, ``callbacks.base.EVENT_ORDER``, which stands beside the event list in the code.
* ``troubleshooting.md``: the ``<!-- generated: error-index -->`` marker is replaced by every
  ``raise`` of ``ValueError``/``TypeError``/``ImportError``/``ConfigError`` (and their
  subclasses defined in the project) in ``trainer/``, ``callbacks/`` and ``strategies/``,
  with the message as written in the source, read with ``ast``.

The generators are plain functions (``config_table``, ``error_index``) so tests can call them.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_MARKER = "<!-- generated: config-keys -->"
ERRORS_MARKER = "<!-- generated: error-index -->"
EVENTS_MARKER = "<!-- generated: event-order -->"
PACKAGES = ("trainer", "callbacks", "strategies")

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping", type(None): "null"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _rows(keys: dict[str, Any], defaults: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    for name, key in keys.items():
        path = f"{prefix}{name}"
        kind = " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in key.types))
        if key.choices is not None:
            kind += ": " + ", ".join(_yaml(choice) for choice in key.choices)
        default = _yaml(defaults[name]) if name in defaults else _yaml(key.default) if key.default is not None else "—"
        anchor = path.replace(".", "-").replace("_", "-")
        rows.append(f'| <a id="{anchor}"></a>`{path}` | {_cell(kind)} | {default} | {_cell(key.help)} |')
        if key.section is not None:
            rows.extend(_rows(key.section, {}, f"{path}."))
    return rows


def config_table(config_module: Any = None) -> str:
    """Markdown for every key of the launch configuration, from ``trainer.config``'s schema."""
    if config_module is None:
        config_module = _import("trainer.config")
    lines = ["| key | type / allowed values | default | meaning |", "|---|---|---|---|"]
    lines += _rows(config_module.top_keys(), config_module.DEFAULTS, "")
    lines += ["", "`distributed_type` selects the strategy the launched processes run:", "",
              "| `distributed_type` | strategy | what it does |", "|---|---|---|"]
    lines += [f"| `{kind}` | `{spec.name}` | {_cell(spec.summary)} |"
              for spec in config_module.registry.strategy_specs() for kind in spec.distributed_types]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The error index

ERROR_TYPES = {"ValueError", "TypeError", "ImportError", "ModuleNotFoundError",  # and the ValueError subclasses:
               "ConfigError", "DeviceMapError", "CheckpointError", "Fp8UnavailableError", "ShardedCheckpointError",
               "TrackerPackageMissing", "CliError", "MergeError", "EstimateError"}  # an ImportError; the CLI's errors


def _message(node: ast.AST | None) -> str:
    """The message as written: string parts verbatim, ``{expression}`` for f-string fields."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                conversion = "!" + chr(value.conversion) if value.conversion > 0 else ""
                spec = ":" + _message(value.format_spec) if value.format_spec is not None else ""
                parts.append("{" + ast.unparse(value.value) + conversion + spec + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left) + _message(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _message(node.func.value)
    return "{" + ast.unparse(node) + "}"


def _errors_in(path: Path) -> list[tuple[str, str, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{where}.{child.name}" if where else child.name)
                continue
            if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                func = child.exc.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in ERROR_TYPES:
                    message = _message(child.exc.args[0] if child.exc.args else None)
                    found.append((name, where or "(module)", message))
            visit(child, where)

    visit(tree, "")
    return found


def error_index(root: Path = ROOT) -> str:
    """Markdown: one section per module, one row per ``raise`` of a user-facing error."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            errors = [error for error in _errors_in(path) if error[2]]
            if not errors:
                continue
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            out += [f"### `{module}`", "", "| error | raised in | message |", "|---|---|---|"]
            for name, where, message in errors:
                out.append(f"| `{name}` | `{where}` | {_cell(_code_safe(message))} |")
            out.append("")
    return "\n".join(out)


def _code_safe(message: str) -> str:
    """The message in an inline code span (backticks inside become quotes; brackets cannot read as link references)."""
    escaped = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")
    return "<code>" + escaped.replace("[", "&#91;").replace("]", "&#93;") + "</code>"


def _import(name: str) -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_table())
    if ERRORS_MARKER in markdown:
        markdown = markdown.replace(ERRORS_MARKER, error_index())
    if EVENTS_MARKER in markdown:
        markdown = markdown.replace(EVENTS_MARKER, "```text\n" + _import("callbacks.base").EVENT_ORDER + "```")
    return markdown
