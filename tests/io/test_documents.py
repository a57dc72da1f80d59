"""One rule for plain-text corpora, shared by eval (perplexity), sae and refusals --text."""

import pytest
from click.testing import CliRunner

from mlxmerge.abliterate.evaluate import read_documents as refusals_reader
from mlxmerge.cli import cli
from mlxmerge.errors import MlxmergeError
from mlxmerge.eval.tasks import load_task
from mlxmerge.io.documents import read_documents, split_documents
from mlxmerge.sae.activations import read_texts

PARAGRAPHS = "first line of one\nits second line\n\n  \nanother document\n\n\nthe third\n"
LINES = "doc one\ndoc two\n\ndoc three"  # one blank line: blank lines separate, lines stay
PLAIN = "alpha beta\ngamma delta\r\nepsilon\n"


def test_split_documents_rule():
    assert split_documents(PARAGRAPHS) == [
        "first line of one\nits second line",
        "another document",
        "the third",
    ]
    # no blank line anywhere: one document per non-empty line
    assert split_documents(PLAIN) == ["alpha beta", "gamma delta", "epsilon"]
    assert split_documents(LINES) == ["doc one\ndoc two", "doc three"]
    assert split_documents("\n \n") == []


@pytest.mark.parametrize("content", [PARAGRAPHS, PLAIN])
def test_every_reader_uses_the_same_rule(tmp_path, content):
    path = tmp_path / "corpus.txt"
    path.write_text(content)
    want = split_documents(content)
    assert load_task(path).documents == want
    assert read_texts(path) == want
    assert read_documents(path) == want
    assert refusals_reader is read_documents  # refusals --text reads through the same function


def test_empty_text_file_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(MlxmergeError, match="no text found"):
        read_documents(tmp_path / "e.txt")


def test_eval_counts_documents_by_the_rule(family, tmp_path):
    path = tmp_path / "ppl.txt"
    path.write_text(PARAGRAPHS)
    r = CliRunner().invoke(cli, ["eval", str(family["model_a"]), "--task", str(path)])
    assert r.exit_code == 0, r.output
    assert "(perplexity, 3 documents;" in r.output
    assert "blank lines" in " ".join(
        CliRunner().invoke(cli, ["sae", "collect", "--help"]).output.split()
    )
