"""The top-level names of `conversa`: one export table, seen alike by mypy and at run time."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import conversa

INIT = Path(conversa.__file__)


def type_checking_imports() -> dict[str, str]:
    """Name -> module of every import in __init__.py's ``if TYPE_CHECKING:`` block."""
    tree = ast.parse(INIT.read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    )
    found: dict[str, str] = {}
    for node in block.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                # `X as X` is what makes mypy treat the name as re-exported
                assert alias.asname == alias.name, ast.unparse(node)
                found[alias.name] = "." * node.level + (node.module or "")
    return found


def test_type_checking_imports_export_table_and_all_agree() -> None:
    assert type_checking_imports() == conversa._EXPORTS
    assert sorted(conversa.__all__) == sorted([*conversa._EXPORTS, "__version__"])


@pytest.mark.parametrize("name", sorted(conversa._EXPORTS))
def test_every_export_resolves_to_its_module(name: str) -> None:
    module = importlib.import_module(conversa._EXPORTS[name], "conversa")
    assert getattr(conversa, name) is getattr(module, name)


def test_names_in_public_signatures_are_exported() -> None:
    for name in ["SearchHit", "StateValueError", "Approver", "RequestInterceptor"]:
        assert name in conversa.__all__
    for name in ["ResponseInterceptor", "TokenCounter", "estimate_tokens", "ReactMode"]:
        assert name in conversa.__all__
    for name in ["StopReason", "StateEntry", "RetryNotice", "OnLimit", "StreamEvent"]:
        assert name in conversa.__all__
    assert "SessionOptions" in conversa.__all__  # create_session's **options


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        conversa.Nope  # noqa: B018


def test_version_comes_from_the_package_metadata() -> None:
    assert conversa.__version__ == importlib.metadata.version("conversa-ai")
    assert (
        "version = " + repr(conversa.__version__).replace("'", '"')
        in (INIT.parents[1] / "pyproject.toml").read_text()
    )


def test_version_without_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert conversa._version() == "0+unknown"


def python(code: str) -> str:
    """What a fresh interpreter running ``code`` prints."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout


def test_importing_conversa_loads_no_optional_dependency() -> None:
    # the HTTP face and encryption are extras: conversa, its CLI group and a storage opened
    # from a URL must not import them (start-up time is measured, and they may be missing)
    code = (
        "import sys, conversa, conversa.cli._app, conversa.storage.encrypted; "
        "conversa.open_storage('memory://'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'uvicorn', 'starlette', 'cryptography'}))"
    )
    assert python(code).strip() == "[]"


# -- conversa.model: the same lazy table --------------------------------------------------------


def test_the_model_package_table_its_type_checking_imports_and_all_agree() -> None:
    import conversa.model as model

    tree = ast.parse(Path(model.__file__).read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    )
    seen = {
        alias.name: (node.module or "")
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == model._EXPORTS
    assert sorted(model.__all__) == sorted(model._EXPORTS)
    for name, module in model._EXPORTS.items():
        assert getattr(model, name) is getattr(
            importlib.import_module(f"conversa.model.{module}"), name
        )
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        model.Nope  # noqa: B018


def test_a_session_with_its_own_model_never_loads_the_openai_model_module() -> None:
    code = (
        "import asyncio, sys, conversa\n"
        "from conversa.testing import ScriptedModel\n"
        "asyncio.run(conversa.create_session('x', 'memory://', model=ScriptedModel()))\n"
        "print(sorted(m for m in sys.modules if m.startswith('conversa.model.')))\n"
    )
    printed = python(code).split("\n")[0]
    assert printed == "['conversa.model._protocol', 'conversa.model._resolve']"
