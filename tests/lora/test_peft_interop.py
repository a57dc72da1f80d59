"""PEFT itself reads the extracted adapter, and writes adapters that ``base+adapter`` fuses."""

from __future__ import annotations

import numpy as np
import pytest
from lora_helpers import RANK

from mlxmerge.io import open_checkpoint
from mlxmerge.lora import extract_lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5]]


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def test_peft_loads_the_extracted_adapter(lowrank, tmp_path):
    extract_lora(lowrank["ft"], lowrank["base"], tmp_path / "p", rank=RANK, format="peft")
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(str(lowrank["base"]), torch_dtype=torch.float32)
    base_logits = hf_logits(base)
    ft_logits = hf_logits(load(str(lowrank["ft"]), torch_dtype=torch.float32))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "p"))
    got = hf_logits(model)
    change = np.linalg.norm(ft_logits - base_logits)
    assert change > 1.0
    assert 1 - np.linalg.norm(got - ft_logits) / change >= 0.99
    merged = model.merge_and_unload().state_dict()
    w = merged["model.layers.1.mlp.gate_proj.weight"].numpy()
    ref = open_checkpoint(lowrank["ft"]).get("model.layers.1.mlp.gate_proj.weight")
    np.testing.assert_allclose(w, np.array(ref), atol=1e-5)


def test_peft_reads_rank_pattern_and_modules_to_save(lowrank, tmp_path):
    import json

    import mlx.core as mx

    from mlxmerge.demo.tiny import build_model, save_weights

    base = build_model(tmp_path / "base", lowrank["tokenizer"], seed=3, num_layers=2, tie=False)
    w = {k: v for f in base.glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    w["lm_head.weight"] = w["lm_head.weight"] * 1.2
    w["model.layers.1.self_attn.k_proj.weight"] = 1.1 * w["model.layers.1.self_attn.k_proj.weight"]
    config = json.loads((base / "config.json").read_text())
    ft = save_weights(tmp_path / "ft", w, config, lowrank["tokenizer"])
    extract_lora(ft, base, tmp_path / "p", rank=40, format="peft")  # k/v_proj are capped at 32
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["r"] == 40
    assert config["rank_pattern"]["model.layers.1.self_attn.k_proj"] == 32
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = peft.PeftModel.from_pretrained(
        load(str(base), torch_dtype=torch.float32), str(tmp_path / "p")
    )
    ref = hf_logits(load(str(ft), torch_dtype=torch.float32))
    np.testing.assert_allclose(hf_logits(model), ref, atol=1e-3 * np.abs(ref).max())


def test_an_adapter_saved_by_peft_fuses_like_peft_merges_it(lowrank, tmp_path):
    torch.manual_seed(0)
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(str(lowrank["base"]), torch_dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             rank_pattern={"model.layers.1.mlp.down_proj": 2}, init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(base, config)
    model.save_pretrained(str(tmp_path / "peft"))
    merged = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
    fused = open_checkpoint(f"{lowrank['base']}+{tmp_path / 'peft'}")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.3.mlp.up_proj.weight"):  # fmt: skip
        np.testing.assert_allclose(np.array(fused.get(name)), merged[name], atol=1e-5)


def test_gpt2_peft_adapter_has_transformers_names_and_loads_in_peft(tmp_path):
    import mlx.core as mx
    from archs import ARCHS, arch_weights, build_arch_tokenizer

    from mlxmerge.io.model_folder import ModelCard, write_model
    from mlxmerge.merge.runner import merge

    # Keys were MLX's (base_model.model.model.h.0...): PEFT raised KeyError on transformers' GPT-2.
    tok = build_arch_tokenizer(tmp_path / "tok")
    base_w = arch_weights("gpt2")
    keys = mx.random.split(mx.random.key(7), len(base_w))
    ft_w = {n: v + 0.05 * mx.random.normal(v.shape, key=k) if v.ndim == 2 and ".h." in n else v
            for (n, v), k in zip(sorted(base_w.items()), keys)}  # fmt: skip
    folders = {}
    for name, w in (("base", base_w), ("ft", ft_w)):
        plan = [(n, tuple(v.shape)) for n, v in sorted(w.items())]
        folders[name] = write_model(tmp_path / name, plan, lambda n, w=w: w[n], config=ARCHS["gpt2"],
                                    card=ModelCard(name), layout="hf", tokenizer_source=tok)  # fmt: skip
    extract_lora(folders["ft"], folders["base"], tmp_path / "p", rank=32, format="peft")
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = peft.PeftModel.from_pretrained(load(str(folders["base"]), torch_dtype=torch.float32),
                                           str(tmp_path / "p"))  # fmt: skip
    ft_logits = hf_logits(load(str(folders["ft"]), torch_dtype=torch.float32))
    np.testing.assert_allclose(hf_logits(model), ft_logits, atol=1e-4)  # rank 32 is full rank
    # ... and mlxmerge reads PEFT's GPT-2 names back (base+adapter), fused like PEFT fuses.
    fused = merge({"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": f"{folders['base']}+{tmp_path / 'p'}",
                               "parameters": {"weight": 1.0}}]}, tmp_path / "m", layout="hf")  # fmt: skip
    np.testing.assert_allclose(
        hf_logits(load(str(fused), torch_dtype=torch.float32)), ft_logits, atol=1e-4
    )


def test_an_embedding_adapter_with_peft_base_layer_fuses_like_peft(lowrank, tmp_path):
    """PEFT saves ``embed_tokens.base_layer.weight`` beside an embedding LoRA (its default
    ``save_embedding_layers="auto"``) and loads it over the base's embedding before adding ΔW.
    The saved copy is scaled here so that using it, not the base's, is what the test sees."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    load = transformers.AutoModelForCausalLM.from_pretrained
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                             init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(load(str(lowrank["base"]), torch_dtype=torch.float32), config)
    folder = tmp_path / "peft"
    model.save_pretrained(str(folder))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in weights  # what PEFT wrote by itself
    weights[key] = weights[key] * 1.25
    save_file(weights, str(folder / "adapter_model.safetensors"))
    reference = peft.PeftModel.from_pretrained(
        load(str(lowrank["base"]), torch_dtype=torch.float32), str(folder)
    ).merge_and_unload()
    merged = {k: v.numpy() for k, v in reference.state_dict().items()}
    fused = open_checkpoint(f"{lowrank['base']}+{folder}")
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.2.mlp.up_proj.weight"):  # fmt: skip
        np.testing.assert_allclose(np.array(fused.get(name)), merged[name], atol=1e-5)
