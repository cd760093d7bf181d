"""PEP 562 lazy exports for the package `__init__` modules: a public name imports its module on first use,
so importing a package costs nothing until one of its names is used."""
from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping


def lazy_exports(package: str, sources: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for `package`, whose name N lives in submodule `sources[N]`
    (relative, e.g. ".config").

    A public name that is also the name of its submodule (`sam_peft.data.prepare`, the function in
    `prepare.py`) stays the public object once that submodule is imported, as with eager imports: the
    import system's binding of the submodule to the package attribute is replaced by the name."""

    class LazyPackage(types.ModuleType):
        def __setattr__(self, name: str, value) -> None:
            if (isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}"
                    and sources.get(name) == f".{name}"):
                value = getattr(value, name)
            super().__setattr__(name, value)

    sys.modules[package].__class__ = LazyPackage

    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name], package), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *sources})

    return __getattr__, __dir__, sorted(sources)
