import pytest

import mlxmerge  # noqa: F401  (BLAS before mlx.core)


@pytest.fixture(scope="session")
def refuser(tmp_path_factory):
    """The locally trained toy model that refuses harmful instructions (seed 0)."""
    from mlxmerge.demo.toy_refuser import train_refusing_model

    return train_refusing_model(tmp_path_factory.mktemp("refuser") / "model", seed=0)


@pytest.fixture(scope="session")
def abliterated(refuser, tmp_path_factory):
    """(output folder, report, CLI output) of the default abliteration, run through the CLI."""
    import json

    from click.testing import CliRunner

    from mlxmerge.cli import cli

    out = tmp_path_factory.mktemp("abliterated") / "model"
    res = CliRunner().invoke(
        cli, ["-q", "abliterate", str(refuser), "-o", str(out), "--batch-size", "32"]
    )
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "abliteration.json").read_text()), res.output
