"""Never silent: with stderr not a terminal, long verbs print stage lines and a progress line at
most every INTERVAL seconds (done/total, rate, ETA); -q prints none. A fake clock, no timing."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli, progress


class FakeClock:
    """Each read advances ``step`` seconds: how far apart progress calls are, without sleeping."""

    def __init__(self, step: float):
        self.t, self.step = 1000.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock(4.0)
    monkeypatch.setattr(progress, "clock", clock)
    return clock


def test_line_progress_rate_eta_and_interval(fake_clock, capsys):
    bar = progress.LineProgress(100, "collect", "tok")  # clock read 1: t0 = 1004
    for _ in range(10):
        bar.update(10)  # the k-th update reads the clock at 1004 + 4k
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "collect: started (100 tok)"
    # Lines are due once 15 s passed since the last one: at k = 4 (16 s) and k = 8 (32 s).
    expected = []
    for k in (4, 8):
        n, elapsed = 10 * k, 4.0 * k
        rate = n / elapsed
        eta = (100 - n) / rate
        eta_text = f"{eta:.1f}s" if eta < 10 else f"{eta:.0f}s"  # seconds: 1 decimal below 10
        expected.append(f"collect: {n}/100 tok ({n}%), {rate:.3g} tok/s, ETA {eta_text}")
    assert lines[1:3] == expected
    # close reads the clock once more: 11 reads after t0, 44 s.
    assert lines[3] == f"collect: done, 100 tok in 44s ({100 / 44:.3g} tok/s)"
    assert len(lines) == 4


def test_labelled_stages_each_get_start_and_end_lines(fake_clock, capsys):
    bar = progress.LineProgress(None, "eval", "seq")
    step = progress.labelled_steps(bar, "score ")
    for label in ("a", "b"):
        for done in (5, 10):
            step(label, done, 10)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    starts = [ln for ln in lines if ln.endswith("started (10 seq)")]
    dones = [ln for ln in lines if ": done, 10 seq in " in ln]
    assert starts == ["score a: started (10 seq)", "score b: started (10 seq)"]
    assert [d.split(":")[0] for d in dones] == ["score a", "score b"]
    assert not [ln for ln in lines if ln.startswith("eval: done")]  # the empty first stage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from archs import build_arch, build_arch_tokenizer

    tmp = tmp_path_factory.mktemp("progress")
    model = build_arch("llama", tmp / "llama", build_arch_tokenizer(tmp / "tok"))
    data = tmp / "t.txt"
    data.write_text("\n\n".join(f"the cat number {i} sat on the mat" for i in range(40)))
    return model, data


def test_cli_without_a_terminal_prints_lines_and_quiet_prints_none(tiny, tmp_path, fake_clock):
    model, data = tiny
    fake_clock.step = 20.0  # every batch is more than INTERVAL after the last line
    args = ["sae", "collect", str(model), "--layer", "1", "--data", str(data), "--tokens", "300",
            "--context-size", "16"]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "\r" not in err  # whole lines only: a log file reads line by line
    lines = [ln for ln in err.splitlines() if ln.startswith("collect: ")]
    assert lines[0] == "collect: started (300 tok)"
    ticks = [
        ln for ln in lines if re.fullmatch(r"collect: \d+/300 tok \(\d+%\), \S+ tok/s, ETA \S+", ln)
    ]
    assert ticks, err
    assert re.fullmatch(r"collect: done, 300 tok in \S+ \(\S+ tok/s\)", lines[-1])
    q = CliRunner().invoke(cli, ["-q", *args, "-o", str(tmp_path / "b")])
    assert q.exit_code == 0 and "collect: " not in q.stderr
    # The result itself is on stdout either way.
    assert r.stdout.replace("/a\n", "") == q.stdout.replace("/b\n", "") != ""
