"""Architecture matrix, weights side: every tiny model of ``archs.ARCHS``, in MLX and HF layout,
through inspect, convert (round trips), merges (linear, slerp with a gradient, TIES,
frankenmerge), mlx-lm loading and, with torch installed, transformers loading.

References are independent of mlxmerge's I/O: the weights mlx-lm's own model class was built
with (``arch_weights``), numpy formulas, safetensors' numpy reader, mlx-lm and transformers.
"""

from __future__ import annotations  # noqa: I001  (mlxmerge must precede mlx.core)

import functools
import json
from pathlib import Path

import mlxmerge  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from archs import ARCHS, HIDDEN, LAYERS, MOE_ARCHS, VOCAB, arch_weights, build_arch
from archs import build_arch_tokenizer
from mlxmerge.convert import convert
from mlxmerge.errors import MlxmergeError
from mlxmerge.inspect import inspect_model
from mlxmerge.merge.runner import merge

NAMES = list(ARCHS)
TOKENS = [[1, 5, 9, 12, 40, 7, 100, 250]]
# Where mlx-lm and transformers compute different functions, with the reason (weights still load).
LOGITS_DIFFER = {
    "gemma": "mlx-lm's gemma uses the exact GELU; transformers forces gelu_pytorch_tanh",
    "deepseek_v2": "transformers' DeepseekV2 routes top-k < n_experts differently from mlx-lm "
    "(with every expert active they agree to 1e-6: test_deepseek_v2_all_experts_match)",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Per arch: base in MLX and HF layout, two 'fine-tunes' (one per layout), and the weights."""
    root = tmp_path_factory.mktemp("archs")
    tok = build_arch_tokenizer(root / "tok")
    out = {"root": root, "tok": tok}
    for name in NAMES:
        out[name] = {
            "weights": arch_weights(name),
            "mlx": build_arch(name, root / name / "mlx", tok, layout="mlx"),
            "hf": build_arch(name, root / name / "hf", tok, layout="hf"),
            "ft_mlx": build_arch(name, root / name / "ft_mlx", tok, layout="mlx", perturb=0.05),
            "ft_hf": build_arch(name, root / name / "ft_hf", tok, layout="hf", perturb=0.1),
        }
    return out


def stored(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@functools.cache
def _load(folder: str):
    from mlx_lm.utils import load_model

    return load_model(Path(folder))[0]  # no tokenizer: faster than mlx_lm.load


def mlx_logits(folder: Path) -> np.ndarray:
    return np.array(_load(str(folder))(mx.array(TOKENS)).astype(mx.float32))


def loaded_weights(folder: Path) -> dict[str, np.ndarray]:
    """What mlx-lm ends up holding after loading ``folder`` (its own sanitize included)."""
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(_load(str(folder)).parameters())}


# -- inspect -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["mlx", "hf"])
@pytest.mark.parametrize("name", NAMES)
def test_inspect(zoo, name, layout):
    info = inspect_model(str(zoo[name][layout]))
    weights = zoo[name]["weights"]
    assert info["model_type"] == ARCHS[name]["model_type"]
    assert info["layers"] == LAYERS
    assert info["hidden_size"] == ARCHS[name].get("hidden_size", HIDDEN)
    assert info["vocab_size"] == VOCAB
    assert info["parameters"] == sum(v.size for v in weights.values())
    assert info["tied_embeddings"] == ("lm_head.weight" not in weights)


def test_inspect_gpt2_names_its_hidden_size_field(zoo):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    info = inspect_model(str(zoo["gpt2"]["hf"]))
    assert (info["hidden_size"], info["hidden_size_field"]) == (HIDDEN, "n_embd")
    res = CliRunner().invoke(cli, ["inspect", str(zoo["gpt2"]["mlx"])])
    assert res.exit_code == 0 and f"hidden size: {HIDDEN} (n_embd)" in res.output


# -- layouts and convert -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["mlx", "hf"])
@pytest.mark.parametrize("name", NAMES)
def test_layout_loads_in_mlx_lm_as_built(zoo, name, layout):
    # mlx-lm's sanitize turns either layout into exactly the weights the model was built with.
    got = loaded_weights(zoo[name][layout])
    want = {k: np.array(v) for k, v in zoo[name]["weights"].items()}
    if "lm_head.weight" not in want:
        got.pop("lm_head.weight", None)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        np.testing.assert_array_equal(got[k], w, err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_hf_layout_has_no_stacked_experts(zoo, name):
    hf = stored(zoo[name]["hf"])
    assert not [n for n in hf if "switch_mlp" in n]
    if name in MOE_ARCHS and name != "granitemoe":
        assert [n for n in hf if ".experts.3." in n]  # one tensor per expert
    if name == "granitemoe":  # transformers' own fused 3-D layout: (experts, 2·inter, hidden)
        w = zoo[name]["weights"]
        fused = hf["model.layers.1.block_sparse_moe.input_linear.weight"]
        gate = np.array(w["model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight"])
        up = np.array(w["model.layers.1.block_sparse_moe.switch_mlp.up_proj.weight"])
        np.testing.assert_array_equal(fused, np.concatenate([gate, up], axis=1))
    if name == "gpt2":  # HF Conv1D stores (in, out)
        w = np.array(zoo[name]["weights"]["model.h.2.mlp.c_fc.weight"])
        np.testing.assert_array_equal(hf["h.2.mlp.c_fc.weight"], w.T)


@pytest.mark.parametrize("start", ["mlx", "hf"])
@pytest.mark.parametrize("name", NAMES)
def test_convert_round_trip_is_byte_identical(zoo, name, start, tmp_path):
    other = "hf" if start == "mlx" else "mlx"
    src = zoo[name][start]
    mid = convert(str(src), tmp_path / "mid", dtype="float32", layout=other)
    back = convert(str(mid), tmp_path / "back", dtype="float32", layout=start)
    a, b = stored(src), stored(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    assert stored(mid).keys() == stored(zoo[name][other]).keys()


def test_unknown_stacked_experts_refuse_hf_export(zoo, tmp_path):
    # olmoe-like experts under a model_type whose HF names mlxmerge does not know
    src = zoo["qwen3_moe"]["mlx"]
    folder = tmp_path / "odd"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "qwen3_moe_custom"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlxmergeError, match="no Hugging Face names are known .* qwen3_moe_custom"):
        convert(str(folder), tmp_path / "out", layout="hf")
    assert not (tmp_path / "out").exists()


# -- merges --------------------------------------------------------------------------------


def _w(zoo, name, which) -> dict[str, np.ndarray]:
    """The canonical (MLX-name) float32 weights of one zoo model, via mlx-lm's own loading."""
    return loaded_weights(zoo[name][which])


@pytest.mark.parametrize("name", NAMES)
def test_linear_merge_of_mlx_and_hf_layouts(zoo, name, tmp_path):
    # One input in each layout: both must map to one set of names before planning.
    a, b = zoo[name]["ft_mlx"], zoo[name]["ft_hf"]
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.25}},
                   {"model": str(b), "parameters": {"weight": 0.75}}],
        "parameters": {"normalize": False}, "dtype": "float32",
    }  # fmt: skip
    out = merge(recipe, tmp_path / "out", layout="hf")
    got, wa, wb = loaded_weights(out), _w(zoo, name, "ft_mlx"), _w(zoo, name, "ft_hf")
    for k in wa:
        np.testing.assert_allclose(got[k], 0.25 * wa[k] + 0.75 * wb[k], rtol=1e-5, atol=1e-6)
    assert np.isfinite(mlx_logits(out)).all()


@pytest.mark.parametrize("name", NAMES)
def test_slerp_gradient(zoo, name, tmp_path):
    a, b = zoo[name]["mlx"], zoo[name]["ft_hf"]
    recipe = {
        "merge_method": "slerp", "base_model": str(a), "dtype": "float32",
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, LAYERS]},
                                {"model": str(b), "layer_range": [0, LAYERS]}]}],
        "parameters": {"t": [0.0, 1.0]},
    }  # fmt: skip
    out = merge(recipe, tmp_path / "out")
    got, wa, wb = loaded_weights(out), _w(zoo, name, "mlx"), _w(zoo, name, "ft_hf")
    first = [k for k in wa if ".0." in k and k.split(".0.")[0].endswith(("layers", "h"))]
    last = [k for k in wa if f".{LAYERS - 1}." in k]
    assert first and last
    for k in first:  # t = 0 at the first layer: A
        np.testing.assert_allclose(got[k], wa[k], rtol=1e-5, atol=1e-6)
    for k in last:  # t = 1 at the last layer: B
        np.testing.assert_allclose(got[k], wb[k], rtol=1e-5, atol=1e-6)
    assert np.isfinite(mlx_logits(out)).all()


@pytest.mark.parametrize("name", NAMES)
def test_ties_density_one_is_task_arithmetic(zoo, name, tmp_path):
    # TIES with density 1 and one model is task arithmetic: base + w·(ft − base).
    base, ft = zoo[name]["hf"], zoo[name]["ft_mlx"]
    recipe = {
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(base)},
                   {"model": str(ft), "parameters": {"weight": 0.5, "density": 1.0}}],
        "parameters": {"normalize": False},
    }  # fmt: skip
    out = merge(recipe, tmp_path / "out")
    got, wb, wf = loaded_weights(out), _w(zoo, name, "hf"), _w(zoo, name, "ft_mlx")
    for k in wb:
        np.testing.assert_allclose(got[k], wb[k] + 0.5 * (wf[k] - wb[k]), rtol=1e-5, atol=1e-6)
    assert np.isfinite(mlx_logits(out)).all()


@pytest.mark.parametrize("layout", ["mlx", "hf"])
@pytest.mark.parametrize("name", NAMES)
def test_frankenmerge_renumbers_layers(zoo, name, layout, tmp_path):
    from mlxmerge.merge.plan import plan_merge

    a, b = zoo[name][layout], zoo[name]["ft_mlx"]
    recipe = {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                   {"sources": [{"model": str(b), "layer_range": [1, 4]}]}],
    }  # fmt: skip
    plan = plan_merge(recipe)  # what --dry-run prints: must be the plan that runs
    assert plan.num_layers == 6 and len({p.name for p in plan.tensors}) == len(plan.tensors)
    out = merge(plan, tmp_path / "out", layout=layout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("n_layer", cfg.get("num_hidden_layers")) == 6
    got, wa, wb = loaded_weights(out), _w(zoo, name, layout), _w(zoo, name, "ft_mlx")
    import re

    def moved(k: str, src: int, dst: int) -> str:
        return re.sub(rf"\.(layers|h)\.{src}\.", rf".\g<1>.{dst}.", k, count=1)

    for dst, (w, src) in enumerate([(wa, 0), (wa, 1), (wa, 2), (wb, 1), (wb, 2), (wb, 3)]):
        keys = [k for k in w if re.search(rf"\.(layers|h)\.{src}\.", k)]
        assert keys
        for k in keys:
            np.testing.assert_array_equal(got[moved(k, src, dst)], w[k], err_msg=k)
    assert np.isfinite(mlx_logits(out)).all()


def test_frankenmerge_gpt2_cli_dry_run_and_run(zoo, tmp_path):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    a, b = zoo["gpt2"]["hf"], zoo["gpt2"]["ft_hf"]
    args = ["frankenmerge", "--slice", f"{a}:0-3", "--slice", f"{b}:1-4"]
    dry = CliRunner().invoke(cli, [*args, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["output_layers"] == 6
    res = CliRunner().invoke(
        cli, [*args, "-o", str(tmp_path / "x"), "--format", "hf", "--out-dtype", "float32"]
    )
    assert res.exit_code == 0, res.output
    assert "h.5.mlp.c_fc.weight" in stored(tmp_path / "x")
    assert np.isfinite(mlx_logits(tmp_path / "x")).all()


# -- transformers interop --------------------------------------------------------------------


def _transformers_logits(folder: Path) -> tuple[np.ndarray, dict]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True, dtype=torch.float32
    )
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits.numpy()
    return logits, {k: sorted(v) for k, v in info.items() if v and "keys" in k}


def _check_in_transformers(folder: Path, name: str) -> None:
    got, problems = _transformers_logits(folder)
    assert problems == {}, f"{name}: transformers reports {problems}"
    if name in LOGITS_DIFFER:
        pytest.xfail(LOGITS_DIFFER[name])
    np.testing.assert_allclose(got, mlx_logits(folder), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_hf_layout_loads_in_transformers(zoo, name):
    _check_in_transformers(zoo[name]["hf"], name)


@pytest.mark.parametrize("name", NAMES)
def test_converted_and_merged_hf_outputs_load_in_transformers(zoo, name, tmp_path):
    hf = convert(str(zoo[name]["mlx"]), tmp_path / "conv", dtype="float32", layout="hf")
    _check_in_transformers(hf, name)
    recipe = {
        "merge_method": "slerp", "base_model": str(zoo[name]["ft_mlx"]), "dtype": "float32",
        "models": [{"model": str(zoo[name]["ft_mlx"])}, {"model": str(zoo[name]["hf"])}],
        "parameters": {"t": 0.3},
    }  # fmt: skip
    _check_in_transformers(merge(recipe, tmp_path / "merged", layout="hf"), name)


@pytest.mark.parametrize("name", ["llama", "gpt2", *MOE_ARCHS])
def test_checkpoint_saved_by_transformers_reads_as_built(zoo, name, tmp_path):
    # A file written by another library: transformers' save_pretrained (GPT-2 gets its
    # "transformer." prefix there), converted to MLX layout, holds exactly the built weights.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(zoo[name]["hf"]), dtype=torch.float32
    )
    model.save_pretrained(tmp_path / "saved")
    theirs, ours = stored(tmp_path / "saved"), stored(zoo[name]["hf"])
    if name == "gpt2":  # transformers adds "transformer."; mlx-lm reads only the hub's bare names
        theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    assert theirs.keys() == ours.keys()  # our HF layout is what transformers itself writes
    (tmp_path / "saved" / "config.json").write_text(json.dumps(ARCHS[name]))  # mlx-lm's fields
    mlx = convert(str(tmp_path / "saved"), tmp_path / "mlx", dtype="float32", layout="mlx")
    got = loaded_weights(mlx)
    want = {k: np.array(v) for k, v in zoo[name]["weights"].items()}
    for k, w in want.items():
        np.testing.assert_array_equal(got[k], w, err_msg=k)


def test_deepseek_v2_all_experts_match(tmp_path):
    # The layout is right even where routing differs: with top-k = n_experts no routing choice.
    import archs

    cfg = dict(ARCHS["deepseek_v2"], num_experts_per_tok=4)
    archs.ARCHS["deepseek_v2_all"] = cfg
    try:
        tok = build_arch_tokenizer(tmp_path / "tok")
        hf = build_arch("deepseek_v2_all", tmp_path / "m", tok, layout="hf")
        got, problems = _transformers_logits(hf)
    finally:
        del archs.ARCHS["deepseek_v2_all"]
    assert problems == {}
    np.testing.assert_allclose(got, mlx_logits(hf), atol=1e-4, rtol=1e-4)


# -- the rows, through the CLI ---------------------------------------------------------


def _cli(*args: str):
    from click.testing import CliRunner

    from mlxmerge.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_cli_linear_of_mixtral_mlx_and_hf_layouts(zoo, tmp_path):
    a, b = zoo["mixtral"]["ft_mlx"], zoo["mixtral"]["ft_hf"]
    res = _cli("linear", str(a), str(b), "--weight", "0.5", "--weight", "0.5", "-o",
               str(tmp_path / "x"), "--out-dtype", "float32")  # fmt: skip
    assert res.exit_code == 0, res.output
    got, wa, wb = (
        loaded_weights(tmp_path / "x"),
        _w(zoo, "mixtral", "ft_mlx"),
        _w(zoo, "mixtral", "ft_hf"),
    )
    k = "model.layers.2.block_sparse_moe.switch_mlp.down_proj.weight"
    np.testing.assert_allclose(got[k], 0.5 * wa[k] + 0.5 * wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["phimoe", "granitemoe"])
def test_cli_convert_moe_to_hf_format(zoo, name, tmp_path):
    res = _cli("convert", str(zoo[name]["mlx"]), "-o", str(tmp_path / "hf"), "--format", "hf",
               "--dtype", "float32")  # fmt: skip
    assert res.exit_code == 0, res.output
    names = stored(tmp_path / "hf")
    assert not [n for n in names if "switch_mlp" in n]
    assert names.keys() == stored(zoo[name]["hf"]).keys()


def test_cli_hf_export_of_unknown_experts_refused_at_dry_run(zoo, tmp_path):
    folders = []
    for which in ("mlx", "ft_mlx"):
        folder = tmp_path / which
        folder.mkdir()
        for f in zoo["qwen3_moe"][which].iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "qwen3_moe_custom"}))
        folders.append(str(folder))
    res = _cli(
        "linear", *folders, "--weight", "0.5", "--weight", "0.5", "--format", "hf", "--dry-run"
    )
    assert res.exit_code != 0
    assert len(res.output.strip().splitlines()) == 1 and "qwen3_moe_custom" in res.output
    assert "switch_mlp" in res.output


def test_frankenmerge_refuses_a_moe_layer_where_the_config_says_dense(zoo):
    from mlxmerge.errors import RecipeError
    from mlxmerge.merge.plan import plan_merge

    a = str(zoo["deepseek_v2"]["mlx"])  # layer 0 dense (first_k_dense_replace 1), 1-3 MoE
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": a, "layer_range": [1, 3]}]},
                         {"sources": [{"model": a, "layer_range": [0, 2]}]}]}  # fmt: skip
    with pytest.raises(RecipeError, match=r"output layer 0 is not the kind .* model.layers.0.mlp"):
        plan_merge(recipe)
