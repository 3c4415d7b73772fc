"""clq-compile: a torch.compile backend that quantizes diffusion transformers (W4A4 and more).

    qt = torch.compile(transformer, backend="clq", options={"bits": "w4a4"})
    with clq_compile.calibrating(qt):
        for inputs in calibration_inputs:
            qt(**inputs)
    out = qt(**inputs)                 # quantized from here on
    print(clq_compile.explain(qt))
    clq_compile.save(qt, "model-w4a4.safetensors")      # later: qt = clq_compile.load(model, path)

The public names load their modules (and torch) on first use, so that importing the package,
as the command line does before it parses its arguments, costs nothing.
"""

import importlib
import sys
import types

# public name -> the module of this package that defines it
_PUBLIC = {"clq_backend": "backend", "calibrating": "calibration", "load": "deploy", "release_weights": "deploy",
           "save": "deploy", "explain": "explain", "explain_artifact": "explain", "graphs": "explain",
           "memory_report": "explain", "search_report": "explain", "Options": "options", "parse_options": "options"}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """This package: a public name is looked up in its module the first time it is read."""

    def __getattr__(self, name: str):
        if name not in _PUBLIC:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{_PUBLIC[name]}"), name)
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule `explain` sets the package attribute of that name; the public
        # name is the function `explain` it defines, as it was when this file imported it eagerly.
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_PUBLIC})


sys.modules[__name__].__class__ = _Package
