import importlib

import pytest


@pytest.mark.parametrize("package", ["sepconv.convert", "sepconv.deploy"])
def test_public_names_resolve(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
