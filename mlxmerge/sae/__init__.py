"""Sparse autoencoders on MLX: collect activations, train (TopK, BatchTopK, Matryoshka BatchTopK,
JumpReLU, ReLU), evaluate, inspect features, steer, edit features into the weights; SAELens v6
folders in and out."""

from mlxmerge.sae.ablate import ablate_features
from mlxmerge.sae.activations import ActivationStore, collect
from mlxmerge.sae.evaluate import evaluate_sae
from mlxmerge.sae.features import feature_report
from mlxmerge.sae.model import SAEConfig, SAEError, decode, encode, reconstruct
from mlxmerge.sae.pipeline import quick_sae, train
from mlxmerge.sae.saelens import load_sae, save_sae
from mlxmerge.sae.steer import steer
from mlxmerge.sae.train import TrainConfig, TrainResult, train_sae

__all__ = [
    "ActivationStore", "SAEConfig", "SAEError", "TrainConfig", "TrainResult", "ablate_features",
    "collect", "decode", "encode", "evaluate_sae", "feature_report", "load_sae", "quick_sae", "reconstruct", "save_sae",
    "steer", "train", "train_sae",
]  # fmt: skip
