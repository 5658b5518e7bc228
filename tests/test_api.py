import importlib

import pytest


@pytest.mark.parametrize("package", ["sepconv.convert", "sepconv.deploy"])
def test_public_names_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_no_submodule_shadows_a_public_function():
    """A submodule named like the function it exports would replace that function on the package once imported."""
    import pkgutil
    import types

    import sepconv.convert

    for info in pkgutil.iter_modules(sepconv.convert.__path__):
        importlib.import_module(f"sepconv.convert.{info.name}")
    for name in sepconv.convert.__all__:
        value = getattr(sepconv.convert, name)
        assert name == "errors" or not isinstance(value, types.ModuleType), f"sepconv.convert.{name} is a module"
