"""The lease scripts shorten the kernels' autotune lists in place (that is how a lease compiles
fewer configs); tests that run them get the lists back afterwards, so later tests see the shipped
configurations."""

import importlib

import pytest

CONFIG_LISTS = {"clq_compile.kernels.triton_gemm": ("SM90_CONFIGS", "SM80_CONFIGS"),
                "clq_compile.kernels.triton_weight_only": ("CONFIGS",)}


@pytest.fixture(autouse=True)
def shipped_config_lists():
    modules = {mod: importlib.import_module(mod) for mod in CONFIG_LISTS}
    saved = {(mod, name): list(getattr(modules[mod], name))
             for mod, names in CONFIG_LISTS.items()
             for name in names if isinstance(getattr(modules[mod], name, None), list)}
    yield
    for (mod, name), configs in saved.items():
        getattr(modules[mod], name)[:] = configs
