"""Every public verb named in ``mlxmerge.__all__`` resolves to the library function."""

import importlib

import mlxmerge


def test_public_verbs_resolve_to_functions():
    for name in mlxmerge.__all__:
        if name != "__version__":
            assert callable(getattr(mlxmerge, name)), name
    importlib.import_module("mlxmerge.merge.soup")  # importing more submodules changes nothing
    importlib.import_module("mlxmerge.convert")
    assert mlxmerge.merge is importlib.import_module("mlxmerge.merge.runner").merge
    assert mlxmerge.convert is importlib.import_module("mlxmerge.convert").convert
    assert mlxmerge.train_sae is importlib.import_module("mlxmerge.sae.pipeline").train
