"""The dry run's memory estimate against a measured peak; memory warnings; disk refusals."""

import json
import subprocess
import sys
from collections import namedtuple

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxmerge.cli import cli
from mlxmerge.demo.tiny import save_weights
from mlxmerge.errors import OutputError
from mlxmerge.merge import runner

VOCAB, HIDDEN, INTER, LAYERS = 32000, 512, 1408, 2

CHILD = r"""
import json, resource, sys
import mlxmerge, mlx.core as mx
from mlxmerge.merge.runner import merge, plan_merge, plan_summary
plan = plan_merge(json.loads(sys.argv[1]))
estimate = plan_summary(plan, mx.bfloat16)["estimated_peak_bytes"]
merge(plan, sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak = peak if sys.platform == "darwin" else peak * 1024
try:  # Linux carries ru_maxrss over exec from the forking parent (here pytest): use VmHWM
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    peak = int(hwm.split()[1]) * 1024
except OSError:
    pass
print(json.dumps({"estimate": estimate, "peak": peak}))
"""


@pytest.fixture(scope="module")
def midsize(family, tmp_path_factory):
    """Three bf16 Llama-shaped models of ~70 MB, the largest tensor 65 MB in float32."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
              "model.norm.weight": (HIDDEN,)}  # fmt: skip
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        for n, s in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                     ("down_proj", (HIDDEN, INTER))):  # fmt: skip
            shapes[p + f"mlp.{n}.weight"] = s
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": INTER,
              "num_attention_heads": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
              "vocab_size": VOCAB, "tie_word_embeddings": False}  # fmt: skip
    root = tmp_path_factory.mktemp("midsize")
    out = {}
    for seed, name in enumerate(("base", "a", "b")):
        keys = mx.random.split(mx.random.key(seed), len(shapes))
        w = {n: 0.02 * mx.random.normal(s, key=k) for (n, s), k in zip(shapes.items(), keys)}
        out[name] = save_weights(root / name, w, config, family["tokenizer"], dtype=mx.bfloat16)
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="the fit was measured on Linux (CPU)")
@pytest.mark.parametrize("method", ["linear", "ties", "breadcrumbs_ties", "della", "sce"])
def test_estimate_is_within_20_percent_of_the_measured_peak(midsize, tmp_path, method):
    models = [{"model": str(midsize[k]), "parameters": {"weight": 0.5, "density": 0.5}}
              for k in ("a", "b")]  # fmt: skip
    recipe = {"merge_method": method, "models": models}
    if method == "linear":
        for m in models:
            del m["parameters"]["density"]
    if method == "sce":
        for m in models:
            del m["parameters"]
        recipe["parameters"] = {"select_topk": 0.5}
    if method != "linear":
        recipe["base_model"] = str(midsize["base"])
        recipe["models"] = [{"model": str(midsize["base"])}, *models]
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe), str(tmp_path / "o")],
                         check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.8 <= got["estimate"] / got["peak"] <= 1.2, got


def two_models(family):
    return {"merge_method": "linear", "models": [
        {"model": str(family[k]), "parameters": {"weight": 0.5}} for k in ("model_a", "model_b")]}  # fmt: skip


def test_output_larger_than_the_free_disk_is_refused(family, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        OutputError, match=r"needs \d+\.\d\d [KMG]B but the disk holding .* has 1\.00 KB free"
    ):
        runner.merge(two_models(family), tmp_path / "deep" / "out")
    assert not (tmp_path / "deep").exists()


def test_estimate_above_available_memory_warns_before_compute(
    family, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(runner, "available_memory", lambda: 1000)
    order = []
    real = runner.compute_tensor
    monkeypatch.setattr(
        runner, "compute_tensor", lambda *a, **k: order.append("compute") or real(*a, **k)
    )
    caplog.set_level("WARNING")
    plan = runner.plan_merge(two_models(family))
    runner.merge(plan, tmp_path / "o")
    warning = next(w for w in plan.warnings if "memory" in w)
    assert "1.00 KB is available" in warning and "needs about" in warning
    assert order and caplog.records[0].getMessage() == warning  # logged before any tensor


def test_dry_run_shows_available_memory_and_free_disk(family, tmp_path):
    res = CliRunner().invoke(cli, ["linear", str(family["model_a"]), str(family["model_b"]),
                                   "--weight", "1", "--dry-run", "-o", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "available" in res.output and "free for the output" in res.output
