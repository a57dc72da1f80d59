"""HF layout splits mlx-lm's stacked MoE experts back into one tensor per expert."""

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten

from mlxmerge.convert import convert
from mlxmerge.demo.tiny import build_tokenizer, model_from_config, save_weights, tiny_config
from mlxmerge.io import open_checkpoint


def test_stacked_experts_round_trip_through_hf_layout(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    cfg = tiny_config(num_layers=2) | {"model_type": "mixtral", "num_local_experts": 4,
                                      "num_experts_per_tok": 2, "architectures": ["MixtralForCausalLM"]}  # fmt: skip
    weights = dict(tree_flatten(model_from_config(cfg, 0).parameters()))
    mlx_dir = save_weights(tmp_path / "mlx", weights, cfg, tok, layout="mlx")
    hf = convert(str(mlx_dir), tmp_path / "hf", dtype="float32", layout="hf")
    ck = open_checkpoint(hf)
    assert not [n for n in ck.entries if "switch_mlp" in n]  # stored names, not the MLX view
    stacked = weights["model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight"]
    for e in range(4):
        got = np.array(ck.get(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"))
        np.testing.assert_array_equal(got, np.array(stacked[e]))
    # mlx-lm stacks them again on load: same logits as the original
    tokens = mx.array([[1, 5, 9, 12, 40]])
    m0, _ = mlx_lm.load(str(mlx_dir))
    m1, _ = mlx_lm.load(str(hf))
    np.testing.assert_allclose(np.array(m1(tokens)), np.array(m0(tokens)), rtol=1e-5, atol=1e-5)
