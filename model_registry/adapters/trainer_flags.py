"""The flags a trainer declares: its module's `add_argument("--…")` calls, read from the source, never run."""

from __future__ import annotations

import ast
from pathlib import Path

from model_registry.domain.errors import InvalidInput


def declared_flags(source: Path, module: str) -> tuple[str, ...]:
    """Option strings (`--epochs`, `-e`) of every `add_argument` call in `module`'s file under `source`."""
    rel = Path(*module.split("."))
    path = rel.with_suffix(".py") if (source / rel).with_suffix(".py").is_file() else rel / "__main__.py"
    try:
        tree = ast.parse((source / path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read the flags {module} declares: {exc}",
                           "fix the trainer, or list the flags under `args_allowed` in starchart.yaml") from None
    flags = [arg.value for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
             for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
             and arg.value.startswith("-")]
    return tuple(dict.fromkeys(flags))
