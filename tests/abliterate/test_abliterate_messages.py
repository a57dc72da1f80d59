"""When the markers catch no refusal, abliterate's stop message says how to proceed."""

from click.testing import CliRunner

from mlxmerge.cli import cli


def test_refuses_none_says_how_to_proceed(refuser, tmp_path):
    markers = tmp_path / "markers.txt"
    markers.write_text("Zzqx never said\n")  # a model whose refusals these markers miss
    res = CliRunner().invoke(
        cli, ["abliterate", str(refuser), "-o", str(tmp_path / "out"), "--markers", str(markers),
              "--batch-size", "32"],
    )  # fmt: skip
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and "refuses none" in line
    assert "--markers FILE" in line and "--direction-layer" in line
    assert not (tmp_path / "out").exists()
