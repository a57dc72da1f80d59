"""Outputs: never over an input (references resolved first), never over another job's output,
nothing hidden left behind after SIGTERM/SIGHUP, links written through, a full disk in one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

import mlxmerge
from mlxmerge.cli import cli
from mlxmerge.io.output import atomic_folder

ROOT = Path(mlxmerge.__file__).resolve().parents[1]  # the package under test, for subprocesses


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links followed) by its SHA-256: an input must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def hidden_beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def mlx_adapter(folder: Path, base: Path) -> Path:
    """A rank-2 mlx-lm LoRA adapter on layer 0's q_proj of ``base`` (64 → 64)."""
    folder.mkdir()
    a = mx.random.normal((64, 2), key=mx.random.key(1))
    b = 0.05 * mx.random.normal((2, 64), key=mx.random.key(2))
    name = "model.layers.0.self_attn.q_proj"
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        {f"{name}.lora_a": a, f"{name}.lora_b": b})  # fmt: skip
    config = {"fine_tune_type": "lora", "num_layers": 1, "model": str(base),
              "lora_parameters": {"rank": 2, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# Without a terminal a stage that did work says so (cli.progress): "convert: started (38 tensor)".
PROGRESS_LINE = re.compile(r"^[\w -]+: (started|done, |\d)")


def error_lines(text: str) -> list[str]:
    """The lines of ``text`` that are not progress lines."""
    return [line for line in text.strip().splitlines() if not PROGRESS_LINE.match(line)]


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def adapter(family, tmp_path):
    return mlx_adapter(tmp_path / "adapter", family["base"])


@pytest.mark.parametrize("where", ["adapter", "inside", "base"])
def test_convert_never_writes_over_or_into_an_adapter_or_base(family, adapter, tmp_path, where):
    import shutil

    base = shutil.copytree(family["base"], tmp_path / "base")  # a copy: the fixture is shared
    ref = f"{base}+{adapter}"
    out = {"adapter": adapter, "inside": adapter / "fused", "base": base}[where]
    before, base_before = tree_digest(adapter), tree_digest(base)
    one_line_error(run("convert", ref, "-o", out, "--force"), "input")
    assert tree_digest(adapter) == before and tree_digest(base) == base_before
    assert not (adapter / "fused").exists()


def test_every_merge_verb_resolves_adapter_references(family, adapter):
    ref = f"{family['base']}+{adapter}"
    before = tree_digest(adapter)
    one_line_error(
        run("linear", ref, family["model_a"], "--weight", "0.5", "-o", adapter / "x"), "input"
    )
    one_line_error(run("extract-lora", ref, "--base", family["base"], "--rank", "2", "-o", adapter, "--force"),
                   "input")  # fmt: skip
    one_line_error(run("abliterate", ref, "-o", adapter / "x"), "input")
    one_line_error(run("frankenmerge", "--slice", f"{ref}:0-2", "-o", adapter, "--force"), "input")
    assert tree_digest(adapter) == before


def test_output_through_a_link_lands_in_the_link_target(family, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    r = run("convert", family["base"], "-o", link)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "config.json").is_file() and (real / "model.safetensors").is_file()
    assert hidden_beside(link) == [] and hidden_beside(real) == []


def test_a_dangling_link_is_refused(family, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    one_line_error(run("convert", family["base"], "-o", link), "does not exist")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_target_filled_meanwhile_is_kept(family, tmp_path, monkeypatch):
    """Another job finishing first: this one stops at the end and keeps the other's model."""
    import mlxmerge.io.model_folder as mf

    out = tmp_path / "out"
    real_card = mf.write_card

    def other_job_finishes(target, card, layout):
        out.mkdir()
        (out / "theirs.txt").write_text("the other job's model")
        real_card(target, card, layout)

    monkeypatch.setattr(mf, "write_card", other_job_finishes)
    one_line_error(run("convert", family["base"], "-o", out), str(out), "another job")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert hidden_beside(out) == []


def test_a_second_job_on_a_locked_target_stops_in_one_line(family, tmp_path):
    from mlxmerge.io.output import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        line = one_line_error(run("convert", family["base"], "-o", out), "another mlxmerge job")
        assert f"PID {os.getpid()}" in line
    assert not out.exists() and hidden_beside(out) == []
    r = run("convert", family["base"], "-o", out)  # the lock is gone with its holder
    assert r.exit_code == 0, r.output


def test_stale_partial_of_a_dead_job_is_removed_and_a_live_ones_kept(family, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".out.partial-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f".out.partial-{os.getppid()}-abcd1234"
    other = tmp_path / f".other.partial-{int(dead.stdout)}-abcd1234"
    for p in (stale, live, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 100)
    r = run("convert", family["base"], "-o", out)
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and other.exists()


def test_an_interrupted_swap_is_put_back(tmp_path):
    """Killed between moving the old target aside and renaming the new one in: the next run
    restores the old target rather than deleting it."""
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    old = tmp_path / f".out.old-{int(dead.stdout)}"
    old.mkdir()
    (old / "kept.txt").write_text("previous model")
    with pytest.raises(RuntimeError), atomic_folder(out):
        raise RuntimeError("fails before the rename")
    assert (out / "kept.txt").read_text() == "previous model" and hidden_beside(out) == []


SIGNAL_JOB = textwrap.dedent("""
    import sys, time
    import mlxmerge.io.model_folder as mf
    from mlxmerge.cli import cli
    real = mf.write_card
    def slow(target, card, layout):
        real(target, card, layout)
        print("READY", flush=True)
        time.sleep(60)
    mf.write_card = slow
    cli(["convert", sys.argv[1], "-o", sys.argv[2]], prog_name="mlxmerge")
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_leave_nothing_behind(family, tmp_path, sig):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_JOB, str(family["base"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == "READY"
    assert any(n.startswith(".out.partial-") for n in hidden_beside(out))  # mid-write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    if sig != signal.SIGINT:
        assert error_lines(err) == [f"Error: stopped by {sig.name}; partial outputs were removed"]
        assert proc.returncode == 128 + sig
    assert not out.exists() and hidden_beside(out) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs with 512 KB left: less than any output needs with its 1 MB of slack."""
    if os.geteuid() != 0 or sys.platform != "linux":
        pytest.skip("mounts a tmpfs (root on Linux)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    if subprocess.run(mount, check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    (disk / "filler").write_bytes(b"\0" * (1536 * 1024))
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def verb_argv(verb, family, tmp_path, out):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One short document.\n\nAnother one, a little longer than the first.\n")
    return {
        "convert": ["convert", family["base"], "-o", out, "--dtype", "float32"],
        "extract-lora": ["extract-lora", family["model_a"], "--base", family["base"],
                         "--rank", "2", "-o", out],
        "sae collect": ["sae", "collect", family["base"], "--layer", "1", "--data", corpus,
                        "--tokens", "64", "-o", out],
    }[verb]  # fmt: skip


@pytest.mark.parametrize("verb", ["convert", "extract-lora", "sae collect"])
def test_no_room_is_refused_before_writing(family, tmp_path, small_disk, verb):
    line = one_line_error(run(*verb_argv(verb, family, tmp_path, small_disk / "out")), "needs")
    assert "free" in line and str(small_disk / "out") in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("verb, module", [("convert", "mlxmerge.io.model_folder"),
                                          ("extract-lora", "mlxmerge.lora.extract")])  # fmt: skip
def test_a_disk_filling_up_mid_write_is_one_line(family, tmp_path, small_disk, monkeypatch, verb,
                                                  module):  # fmt: skip
    """Room taken by someone else after the check: ENOSPC (or mlx's errno-less write error)."""
    import importlib

    monkeypatch.setattr(importlib.import_module(module), "check_free_space", lambda *a, **k: None)
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024**2 - 8 * 1024))
    one_line_error(run(*verb_argv(verb, family, tmp_path, small_disk / "out")), "is full")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_cached_hub_id_is_resolved_before_the_output_check(family, tmp_path, monkeypatch):
    """``org/name`` reads the hub cache: an output inside the repo's cache folder is refused."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(family["base"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = tree_digest(repo)
    for out in (snapshot, snapshot / "fused", repo / "blobs"):
        one_line_error(run("convert", "org/tiny", "-o", out, "--force"), "input org/tiny")
    assert tree_digest(repo) == before
    r = run("convert", "org/tiny", "-o", tmp_path / "ok")  # the same reference, elsewhere: fine
    assert r.exit_code == 0, r.output


TWO_JOBS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlxmerge.cli import cli
    me, other = Path(sys.argv[3]), Path(sys.argv[4])
    me.touch()
    while not other.exists():  # both start converting at the same instant
        time.sleep(0.005)
    cli(["convert", sys.argv[1], "-o", sys.argv[2], "--dtype", sys.argv[5]], prog_name="mlxmerge")
""")


def test_two_jobs_with_one_output_one_wins_one_says_so(family, tmp_path):
    """Two jobs started together on one ``-o``: one writes the model, the other stops in one line."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    marks = [tmp_path / "ready-0", tmp_path / "ready-1"]
    dtypes = ("float32", "float16")
    jobs = [subprocess.Popen([sys.executable, "-c", TWO_JOBS, str(family["base"]), str(out),
                              str(marks[i]), str(marks[1 - i]), dtypes[i]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(2)]  # fmt: skip
    results = [(j.wait(timeout=300), j.stderr.read()) for j in jobs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1).strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error: ") and str(out) in err
    winner = dtypes[[rc for rc, _ in results].index(0)]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == winner
    assert hidden_beside(out) == []


def test_an_output_whose_folder_cannot_be_made_is_one_line(family, tmp_path):
    (tmp_path / "file").write_text("a file where a folder is needed")
    one_line_error(run("convert", family["base"], "-o", tmp_path / "file" / "out"), "is a file")
    assert (tmp_path / "file").read_text() == "a file where a folder is needed"


def test_outputs_follow_the_umask(family, tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    assert run("convert", family["base"], "-o", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700


def test_dot_as_the_output_with_force(family, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "old.txt").write_text("x")
    monkeypatch.chdir(here)
    res = run("convert", family["base"], "-o", ".", "--force")
    assert res.exit_code == 0, res.output
    assert not (here / "old.txt").exists() and (here / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # nothing hidden beside it
