"""Merge search: mergekit-evolve's CMA-ES over a merge genome, scored with ``mlxmerge.eval``."""

from mlxmerge.evolve.config import EvolveConfig, parse_config
from mlxmerge.evolve.genome import Genome, GenomeDefinition
from mlxmerge.evolve.search import evolve

__all__ = ["EvolveConfig", "Genome", "GenomeDefinition", "evolve", "parse_config"]
