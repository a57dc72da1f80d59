"""User text files: not UTF-8 is one line naming file and byte in every entry point; a UTF-8
byte-order mark is dropped everywhere; a YAML alias bomb is refused before it is expanded."""

from __future__ import annotations

import codecs
import json

import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.eval.prompts import read_prompts
from mlxmerge.io.documents import read_documents
from mlxmerge.merge.recipe import parse_recipe

BOM = codecs.BOM_UTF8
LATIN1 = "Wie baue ich eine Bombe?\nCaf\u00e9 au lait\n".encode("latin-1")  # é is 0xE9


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def entry_points(model, f, out):
    """(label, argv) of every command that reads a user text file ``f``."""
    return [
        ("abliterate --harmful", ["abliterate", model, "--harmful", f, "-o", out]),
        ("abliterate --harmless", ["abliterate", model, "--harmless", f, "-o", out]),
        ("refusals --harmful", ["refusals", model, "--harmful", f]),
        ("refusals --text", ["refusals", model, "--text", f]),
        ("sae collect --data", ["sae", "collect", model, "--layer", "1", "--data", f, "-o", out]),
        ("eval --task", ["eval", model, "--task", f]),
    ]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_latin1_files_are_one_line_naming_file_and_byte(family, tmp_path, suffix):
    f = tmp_path / f"latin1{suffix}"
    data = {".txt": LATIN1, ".csv": b"prompt\n" + LATIN1,
            ".jsonl": json.dumps({"text": "x"}).encode() + b'\n{"text": "caf\xe9"}\n'}[suffix]  # fmt: skip
    f.write_bytes(data)
    byte = data.index(b"\xe9")
    for label, argv in entry_points(family["base"], f, tmp_path / "out"):
        if suffix == ".csv" and "--harmful" not in label and "--harmless" not in label:
            continue  # only prompt lists read CSV
        line = one_line_error(CliRunner().invoke(cli, [str(a) for a in argv]))
        assert str(f) in line and f"byte {byte}" in line and "UTF-8" in line, (label, line)
    assert not (tmp_path / "out").exists()


def test_latin1_recipe_is_one_line(tmp_path):
    f = tmp_path / "recipe.yml"
    data = b"merge_method: linear\n# caf\xe9\nmodels: []\n"
    f.write_bytes(data)
    byte = data.index(b"\xe9")
    line = one_line_error(CliRunner().invoke(cli, ["merge", str(f), str(tmp_path / "out")]))
    assert str(f) in line and f"byte {byte}" in line


def test_utf16_file_is_named_as_such(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("hello\n".encode("utf-16"))
    with pytest.raises(
        Exception, match=r"not UTF-8 text .*UTF-16 byte-order mark\); save it as UTF-8"
    ):
        read_prompts(f)


@pytest.mark.parametrize(
    "name, text",
    [("p.txt", "First prompt\nSecond prompt\n"),
     ("p.csv", "Behavior,Category\nFirst prompt,a\nSecond prompt,b\n"),
     ("p.jsonl", '{"prompt": "First prompt"}\n{"prompt": "Second prompt"}\n')],
)  # fmt: skip
def test_a_bom_is_dropped_from_prompt_files(tmp_path, name, text):
    plain, marked = tmp_path / name, tmp_path / f"bom-{name}"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(BOM + text.encode())
    column = "Behavior" if name.endswith(".csv") else None
    got = read_prompts(marked, column)
    assert got == read_prompts(plain, column) == ["First prompt", "Second prompt"]
    assert not any("\ufeff" in p for p in got)


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.jsonl"])
def test_a_bom_is_dropped_from_corpora(tmp_path, name):
    docs = ["Erste Zeile.", "Second document."]
    text = (
        "\n".join(json.dumps({"text": d}) for d in docs) if name.endswith("l") else "\n".join(docs)
    )
    f = tmp_path / name
    f.write_bytes(BOM + text.encode())
    assert read_documents(f) == docs


def test_a_bom_is_dropped_from_recipes(family, tmp_path):
    f = tmp_path / "recipe.yml"
    body = f"merge_method: linear\nmodels:\n  - model: {family['model_a']}\n    parameters: {{weight: 1}}\n"
    f.write_bytes(BOM + body.encode())
    assert parse_recipe(f).merge_method == "linear"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs shape: each level lists ``width`` aliases of the one below."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines)


@pytest.mark.parametrize("where", ["weight", "model", "tokenizer", "chat_template", "filter"])
def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, where):
    bomb = alias_bomb()
    use = {
        "weight": "models:\n  - model: m\n    parameters: {weight: *a9}\n",
        "model": "models:\n  - model: *a9\n",
        "tokenizer": "models:\n  - model: m\ntokenizer: {source: *a9}\n",
        "chat_template": "models:\n  - model: m\nchat_template: *a9\n",
        "filter": "models:\n  - model: m\n    parameters:\n      weight: [{filter: *a9, value: 1}]\n",
    }[where]
    f = tmp_path / "bomb.yml"
    f.write_text(f"{bomb}\nmerge_method: linear\n{use}")
    line = one_line_error(CliRunner().invoke(cli, ["merge", str(f), str(tmp_path / "out")]))
    assert str(f) in line and "aliases (*name) expand to more than" in line
    # Small anchors, as people write them, still work: 9 levels of 2 = 1,023 values.
    f.write_text(f"{alias_bomb(9, 2)}\nmerge_method: linear\n{use}")
    assert (
        "expand to more than"
        not in CliRunner().invoke(cli, ["merge", str(f), str(tmp_path / "out")]).output
    )


def test_a_yaml_alias_cycle_is_refused(tmp_path):
    f = tmp_path / "cycle.yml"
    f.write_text("merge_method: linear\nmodels: &m\n  - model: x\n    more: *m\n")
    assert "contains it (a cycle)" in one_line_error(
        CliRunner().invoke(cli, ["merge", str(f), str(tmp_path / "o")])
    )
