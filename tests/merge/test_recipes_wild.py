"""Recipe features from the wild: chat templates, mergekit-multi order, vocabularies, tied heads."""

import json
from pathlib import Path

import pytest

from mlxmerge.errors import MlxmergeError, RecipeError
from mlxmerge.io.chat_template import BUILTIN, builtin_template, resolve_template
from mlxmerge.io.model_folder import copy_tokenizer
from mlxmerge.merge.multi import merge_order
from mlxmerge.merge.plan import plan_merge

MODELS = Path(__file__).parent / "recipes" / "models"


def _folder(tmp_path, name, template):
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return d


def test_named_templates_are_jinja_text_and_auto_takes_the_most_common(tmp_path):
    for name in BUILTIN:
        assert "{%" in builtin_template(name) and "messages" in builtin_template(name)
    assert "<|im_start|>" in builtin_template("chatml")
    assert "<|start_header_id|>" in builtin_template("llama3")
    t1, t2 = (
        "{{ 'one' }}{% for m in messages %}{% endfor %}",
        "{{ 'two' }}{% for m in x %}{% endfor %}",
    )
    folders = [_folder(tmp_path, "a", t1), _folder(tmp_path, "b", t2), _folder(tmp_path, "c", t2)]
    assert resolve_template("auto", folders) == t2
    assert resolve_template("auto", folders[:2]) == t1  # a tie: the first listed
    assert resolve_template("chatml", folders) == builtin_template("chatml")
    assert resolve_template(None, folders) is None


def test_a_template_replaces_the_donors_and_a_name_is_never_stored(tmp_path):
    src = _folder(tmp_path, "src", "{{ 'old inline template' }}")
    (src / "chat_template.jinja").write_text("{{ 'old jinja template' }}{% if x %}{% endif %}")
    keep, new = tmp_path / "keep", tmp_path / "new"
    keep.mkdir(), new.mkdir()
    copy_tokenizer(src, keep)  # no template asked: the donor's files stay as they are
    assert (keep / "chat_template.jinja").read_text().startswith("{{ 'old jinja")
    copy_tokenizer(src, new, builtin_template("llama3"))
    assert (new / "chat_template.jinja").read_text() == builtin_template("llama3")
    assert "chat_template" not in json.loads((new / "tokenizer_config.json").read_text())
    with pytest.raises(MlxmergeError, match="not Jinja text"):
        copy_tokenizer(src, tmp_path / "new", "chatml")


def test_multi_documents_run_in_dependency_order():
    docs = [
        {"name": "c", "models": [{"model": "b"}, {"model": "a"}]},
        {"models": [{"model": "c"}], "base_model": "x"},
        {"name": "a", "models": [{"model": "m"}]},
        {"name": "b", "base_model": "a", "models": [{"model": "n"}]},
    ]
    assert merge_order(docs, "r.yml") == ([2, 3, 0], 1)
    with pytest.raises(RecipeError, match="only the final may"):
        merge_order([{"models": []}, {"models": []}], "r.yml")
    with pytest.raises(RecipeError, match="depend on each other"):
        merge_order([{"name": "a", "base_model": "b"}, {"name": "b", "base_model": "a"}], "r.yml")


def test_cropping_below_the_copied_tokenizer_is_refused():
    """tok_plus has 274 tokens and rows, base 272: a linear merge would keep 272 rows."""
    recipe = {"merge_method": "linear", "models": [
        {"model": str(MODELS / "tok_plus"), "parameters": {"weight": 1}},
        {"model": str(MODELS / "base"), "parameters": {"weight": 1}}]}  # fmt: skip
    with pytest.raises(RecipeError, match="272 rows .* 274 tokens.*tokenizer_source: union"):
        plan_merge(recipe)
    plan = plan_merge({**recipe, "tokenizer_source": "union"})
    assert plan.tensor("model.embed_tokens.weight").shape[0] == 274
    assert plan.config["vocab_size"] == 274


def test_tied_models_with_a_head_copy_stay_tied():
    recipe = {"merge_method": "slerp", "base_model": str(MODELS / "tied_a"),
              "models": [{"model": str(MODELS / "tied_b")}], "parameters": {"t": [0, 1]}}  # fmt: skip
    plan = plan_merge(recipe)
    assert not any(p.name == "lm_head.weight" for p in plan.tensors)
    norm = plan.tensor("model.norm.weight")
    assert norm.t == 0.0 and norm.global_params["t"] == 0  # outside the layers: t = 0


def test_cli_runs_a_mergekit_multi_file_and_removes_the_intermediates(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    monkeypatch.chdir(MODELS.parent)
    r = CliRunner().invoke(cli, ["merge", "07_docs_multimerge.yml", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no intermediates left beside it
