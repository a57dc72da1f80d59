"""`soup` refuses contradictory flags and reports progress while it scores; `eval` stays quiet
about transformers' max-length warning (documents are split into windows first)."""

import json
import logging
import shutil

from click.testing import CliRunner

import mlxmerge.cli.evaluate as cli_evaluate
from mlxmerge.cli import cli


def test_greedy_and_uniform_together_are_refused(family, tmp_path):
    task = tmp_path / "t.txt"
    task.write_text("the cat sat\n")
    r = CliRunner().invoke(cli, ["soup", str(family["model_a"]), str(family["model_b"]),
                                 "--eval", str(task), "--greedy", "--uniform"])  # fmt: skip
    assert r.exit_code == 2 and "give --greedy or --uniform, not both" in r.output


class _Bar:
    def __init__(self, log):
        self.log, self.n, self.total, self.desc = log, 0, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def reset(self, total=None):
        self.total, self.n = total, 0

    def set_description(self, desc):
        self.desc = desc

    def refresh(self):
        self.log.append((self.desc, self.n, self.total))


def test_soup_reports_progress_per_candidate(family, tmp_path, monkeypatch):
    log: list = []
    monkeypatch.setattr(cli_evaluate, "progress_bar", lambda *a, **k: _Bar(log))
    task = tmp_path / "t.txt"
    task.write_text("\n\n".join(f"the cat sat on mat number {i} and then ran" for i in range(5)))
    a, b = str(family["model_a"]), str(family["model_b"])
    r = CliRunner().invoke(
        cli, ["soup", a, b, "--eval", str(task), "--uniform", "--max-length", "8", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["method"] == "uniform"
    # one label per candidate scored: each model alone, then the soup of both
    labels = list(dict.fromkeys(d for d, _, _ in log))
    assert labels == [f"score {a}", f"score {b}", "score soup of 2"]
    for label in labels:
        counts = [(n, t) for d, n, t in log if d == label]
        assert counts[0][0] == 0  # announced before the candidate is built
        assert counts[-1][0] == counts[-1][1] > 0  # and counted up to its total


def test_eval_does_not_leak_the_max_length_warning(family, tmp_path):
    model = tmp_path / "short"
    shutil.copytree(family["model_a"], model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_max_length": 8}))
    task = tmp_path / "long.txt"
    task.write_text(" ".join(["the cat sat on the mat"] * 10) + "\n")

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    try:
        r = CliRunner().invoke(cli, ["eval", str(model), "--task", str(task), "--max-length", "8"])
        assert r.exit_code == 0, r.output
        assert "longer than the specified maximum" not in r.output
        assert not [x for x in records if "longer than the specified" in x.getMessage()]
        # the same tokenization without the filter does warn: the test can see the warning
        from mlx_lm.utils import load_tokenizer

        base = logging.getLogger("transformers.tokenization_utils_base")
        kept = list(base.filters)
        for f in kept:
            base.removeFilter(f)
        try:
            load_tokenizer(model).encode(task.read_text())
        finally:
            for f in kept:
                base.addFilter(f)
        assert [x for x in records if "longer than the specified" in x.getMessage()]
    finally:
        tlog.removeHandler(handler)
