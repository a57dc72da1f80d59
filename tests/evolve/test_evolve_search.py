"""CMA-ES on a task whose optimum is known, resume after an interruption, and the written recipe
rebuilt byte for byte by ``mlxmerge merge``.

The known optimum: the target is the linear merge 0.75·A + 0.25·B of two random tiny models, and
the task is multiple choice whose answers are the target's own picks, so accuracy 1.0 is reached
at the mixing weight 0.75 (and accuracy falls away from it; 0.5, the search's start, scores
lower). The genome is linear over (A, B) with normalize: the merge is |wA|/(|wA|+|wB|)."""

import json
import random

import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.errors import MlxmergeError
from mlxmerge.evolve import evolve
from mlxmerge.evolve.state import StateError

TARGET = 0.75
BUDGET = 20


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from mlxmerge.demo.tiny import build_model, build_tokenizer
    from mlxmerge.eval.scoring import choice_requests, choice_scores, load_model
    from mlxmerge.eval.tasks import ChoiceItem
    from mlxmerge.merge.runner import merge

    root = tmp_path_factory.mktemp("evolve")
    tok = build_tokenizer(root / "tok")
    kw = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64}
    a = build_model(root / "a", tok, seed=0, **kw)
    b = build_model(root / "b", tok, seed=7, **kw)
    target = merge({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(a), "parameters": {"weight": TARGET}},
        {"model": str(b), "parameters": {"weight": 1 - TARGET}}]}, root / "target")  # fmt: skip
    model, tokenizer = load_model(str(target))
    words = "cat dog sun moon river tree house water fire light red green blue one two three"
    rng = random.Random(0)
    items = [ChoiceItem(" ".join(rng.sample(words.split(), 3)),
                        [" " + w for w in rng.sample(words.split(), 4)], 0) for _ in range(80)]  # fmt: skip
    picks = choice_scores([model], items, choice_requests(tokenizer, items))["predictions"]
    task = root / "mc.jsonl"
    task.write_text("".join(json.dumps({"prompt": it.prompt, "choices": it.choices, "answer": p})
                            + "\n" for it, p in zip(items, picks)))  # fmt: skip
    config = root / "evo.yml"
    config.write_text(
        f"genome: {{models: [{a}, {b}], merge_method: linear}}\ntasks: [{{name: {task}}}]\n"
    )
    return {"root": root, "a": a, "b": b, "task": task, "config": config}


@pytest.fixture(scope="module")
def searched(pair):
    """One uninterrupted search (seed 0), shared by the tests below."""
    out = pair["root"] / "out"
    events = []
    report = evolve(pair["config"], out, budget=BUDGET, seed=0, out_dtype="float32",
                    on_candidate=events.append)  # fmt: skip
    return report, out, events


def test_search_finds_the_known_weight(searched):
    report, _, events = searched
    best, start = report["best"], report["start"]
    assert report["candidates"] == BUDGET == len(events)
    assert start["search"] < 0.9  # mergekit's start, 0.5/0.5, is not the optimum
    assert best["search"] == 1.0  # the target's own picks: the maximum
    wa, wb = (w[0] for w in best["values"]["weight"][0])
    assert abs(wa / (wa + wb) - TARGET) < 0.05
    assert best["held_out"] > start["held_out"]
    # progress events carry the best so far, never decreasing
    bests = [e["best"] for e in events]
    assert bests == sorted(bests) and bests[-1] == best["search"]


def test_written_model_scores_as_the_candidate_and_merge_rebuilds_it(searched, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from mlxmerge.eval.scoring import load_model
    from mlxmerge.evolve.config import parse_config
    from mlxmerge.evolve.objective import Objective

    report, out, _ = searched
    assert json.loads((out / "evolve.json").read_text())["best"]["genes"] == report["best"]["genes"]
    model, _ = load_model(str(out))
    objective = Objective(parse_config(report["config"]), load_tokenizer(out))
    assert objective.score(model)[0] == report["best"]["search"]  # built in memory == written

    again = tmp_path / "again"
    r = CliRunner().invoke(cli, ["merge", str(out / "mlxmerge_config.yml"), str(again)])
    assert r.exit_code == 0, r.output
    written = sorted(p.name for p in out.glob("*.safetensors"))
    assert written and written == sorted(p.name for p in again.glob("*.safetensors"))
    for name in written + ["config.json"]:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_resume_after_an_interruption_gives_the_uninterrupted_result(pair, searched, tmp_path):
    reference, ref_out, _ = searched
    out = tmp_path / "out"
    k = 7

    def interrupt(event):
        if event["event"] == "candidate" and event["index"] == k:
            raise KeyboardInterrupt  # what Ctrl-C raises

    with pytest.raises(KeyboardInterrupt):
        evolve(
            pair["config"], out, budget=BUDGET, seed=0, out_dtype="float32", on_candidate=interrupt
        )
    assert not out.exists()  # nothing half-written
    state = json.loads((tmp_path / "out.evolve.json").read_text())
    assert len(state["candidates"]) == k

    with pytest.raises(MlxmergeError, match="continue it with --resume"):
        evolve(pair["config"], out, budget=BUDGET, seed=0, out_dtype="float32")
    with pytest.raises(StateError, match="seed = 0, this one has 1"):
        evolve(pair["config"], out, budget=BUDGET, seed=1, out_dtype="float32", resume=True)

    events = []
    report = evolve(pair["config"], out, budget=BUDGET, seed=0, out_dtype="float32", resume=True,
                    on_candidate=events.append)  # fmt: skip
    assert events[0] == {"event": "resume", "candidates": k, "state": str(tmp_path / "out.evolve.json"),
                         "best": max(c["score"] for c in state["candidates"])}  # fmt: skip
    assert [e["index"] for e in events[1:]] == list(range(k + 1, BUDGET + 1))  # only the rest ran
    assert report["history"] == reference["history"]
    assert report["best"] == reference["best"]
    assert (out / "model.safetensors").read_bytes() == (ref_out / "model.safetensors").read_bytes()


def test_cli_progress_lines_dry_run_and_errors(pair, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-out"
    r = runner.invoke(cli, ["evolve", str(pair["config"]), "-o", str(out), "--budget", "3",
                            "--out-dtype", "float32", "--seed", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    # one plain line per candidate (stderr is no terminal here)
    lines = [x for x in r.stderr.splitlines() if x.startswith("candidate ")]
    assert [x.split(" (")[0] for x in lines] == ["candidate 1/3", "candidate 2/3", "candidate 3/3"]
    assert "best" in lines[-1] and "wrote" in r.stdout

    r = runner.invoke(cli, ["evolve", str(pair["config"]), "-o", str(tmp_path / "dry"), "--dry-run",
                            "--budget", "50"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "genome: 2 values (1, 2, 1, 1)" in r.stdout and "estimated: 50 candidates" in r.stdout
    assert not (tmp_path / "dry").exists() and not (tmp_path / "dry.evolve.json").exists()

    r = runner.invoke(cli, ["evolve", str(pair["config"]), "-o", str(tmp_path / "x"), "--resume"])
    assert r.exit_code == 1 and "no state file to resume from" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_missing_matplotlib_is_one_line_before_the_search(pair, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(
        MlxmergeError, match=r"--plot needs matplotlib: pip install 'mlxmerge\[plot\]'"
    ):
        evolve(pair["config"], tmp_path / "o", plot=tmp_path / "p.png")
    assert not (tmp_path / "o.evolve.json").exists()


def test_perplexity_needs_a_negative_weight(pair, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("one two three\n\nfour five six\n")
    cfg = tmp_path / "evo.yml"
    cfg.write_text(f"genome: {{models: [{pair['a']}, {pair['b']}], merge_method: linear}}\n"
                   f"tasks: [{{name: {text}}}]\n")  # fmt: skip
    with pytest.raises(
        MlxmergeError, match="perplexity is lower-is-better; give the task a negative weight"
    ):
        evolve(cfg, tmp_path / "o")


def test_streamed_candidates_score_as_in_memory_ones(pair, searched, tmp_path):
    reference, _, _ = searched
    report = evolve(pair["config"], tmp_path / "o", budget=3, seed=0, out_dtype="float32",
                    in_memory=False)  # fmt: skip
    assert report["built"] == "streamed through a temporary folder"
    assert report["history"] == reference["history"][:3]


def test_the_state_file_may_not_be_an_input_a_folder_or_inside_the_output(pair, tmp_path):
    task, weights = pair["task"].read_bytes(), (pair["a"] / "model.safetensors").read_bytes()
    cases = [(pair["task"], "would overwrite"), (pair["config"], "would overwrite"),
             (pair["a"] / "model.safetensors", "would overwrite or sit inside"),
             (tmp_path, "is a folder"), (tmp_path / "o" / "s.json", "sit inside")]  # fmt: skip
    for state, why in cases:
        with pytest.raises(MlxmergeError, match=why):
            evolve(pair["config"], tmp_path / "o", budget=2, state=state, force=True)
    assert pair["task"].read_bytes() == task
    assert (pair["a"] / "model.safetensors").read_bytes() == weights


def test_the_plot_path_is_checked_before_the_search(pair, tmp_path):
    with pytest.raises(MlxmergeError, match=r"--plot .*p\.txt: name a .*png"):
        evolve(pair["config"], tmp_path / "o", budget=2, plot=tmp_path / "p.txt")
    with pytest.raises(MlxmergeError, match="does not exist"):
        evolve(pair["config"], tmp_path / "o", budget=2, plot=tmp_path / "no" / "p.png")
    assert not (tmp_path / "o.evolve.json").exists() and not (tmp_path / "o").exists()


def test_force_replaces_an_existing_output(pair, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    evolve(pair["config"], out, budget=2, seed=0, out_dtype="float32", force=True)
    assert not (out / "old.txt").exists() and (out / "evolve.json").is_file()
