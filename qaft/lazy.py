"""Package attributes that load on first use (PEP 562), so that importing a package costs nothing until its names
are used.

Every module of qaft imports its packages' ``__init__`` first; a command-line tool's ``--help`` imports its
``cli`` module, and so ``qaft``, ``qaft.deploy`` or ``qaft.evaluation``, and must not wait for torch and
transformers (:mod:`qaft.cli_help`). Those packages therefore name their public attributes and the module each
comes from, and :func:`exports` imports that module when an attribute is first read (``from qaft.deploy import
load_quantized`` and ``qaft.apply_method`` work as before). The imports run inside
:func:`qaft.quiet.quiet_imports`: through transformers they import torchao, whose import logs noise.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

from qaft.quiet import quiet_imports


def exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose attribute ``name`` is ``names[name]``'s attribute
    of that name, or the module ``names[name]`` itself where that is ``<package>.<name>`` (a subpackage)."""
    namespace = import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        with quiet_imports():
            module = import_module(names[name])
        value = module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        namespace[name] = value  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__


__all__ = ["exports"]
