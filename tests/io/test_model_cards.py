"""Model cards are for upload: sources by hub id as given or by folder name, never a local path."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.io.model_folder import source_name


def card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_source_names():
    assert (
        source_name("Qwen/Qwen2.5-0.5B-Instruct@refs/pr/3")
        == "Qwen/Qwen2.5-0.5B-Instruct@refs/pr/3"
    )


def test_convert_and_merge_cards_hold_no_local_path(family, tmp_path):
    root = str(family["base"].parent)
    r = CliRunner().invoke(cli, ["convert", str(family["base"]), "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    front, body = card(tmp_path / "c")
    assert root not in body and "`base`" in body and "base_model" not in front

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(family["base"]), "dtype": "float32",
        "models": [{"model": str(family[m]), "parameters": {"weight": 0.5}}
                   for m in ("model_a", "model_b")],
    }))  # fmt: skip
    r = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    front, body = card(tmp_path / "m")
    assert root not in body and "base_model" not in front
    assert "* model_a\n* model_b" in body and "Base model: base" in body
    shown = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert shown["base_model"] == "base" and [m["model"] for m in shown["models"]] == [
        "model_a",
        "model_b",
    ]
    # The replay file keeps the paths: it is for running the merge again on this machine.
    assert str(family["model_a"]) in (tmp_path / "m" / "mlxmerge_config.yml").read_text()
