"""training_curve.png is a matplotlib figure; without matplotlib training still succeeds, the
plot is skipped and the warning names the extra to install."""

from __future__ import annotations

import logging
import sys

import numpy as np

from mlxmerge.sae import train
from mlxmerge.sae.plot import training_curve


def test_training_curve_is_a_two_panel_matplotlib_figure(tmp_path, trained_sae):
    import matplotlib.image

    img = matplotlib.image.imread(str(trained_sae[0] / "training_curve.png"))
    assert img.shape[:2] == (400, 1100)  # figsize (11, 4) at 100 dpi
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50  # lines, text, not blank


def test_without_matplotlib_training_succeeds_and_names_the_extra(
    tmp_path, acts_dir, monkeypatch, caplog
):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with caplog.at_level(logging.WARNING, logger="mlxmerge.sae.plot"):
        assert training_curve([{"tokens": 1, "fvu": 1, "dead_fraction": 0, "l0": 1}],
                              tmp_path / "c.png") is None  # fmt: skip
        summary = train(tmp_path / "s", acts=acts_dir, layer=2, k=4, expansion=2, tokens=512,
                        batch_size=256)  # fmt: skip
    assert "eval_fvu" in summary and (tmp_path / "s" / "cfg.json").is_file()
    assert not (tmp_path / "s" / "training_curve.png").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("pip install 'mlxmerge[plot]'" in w for w in warnings)
    assert all("\n" not in w for w in warnings)
