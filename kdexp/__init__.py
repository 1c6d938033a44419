"""kdexp: knowledge-distillation experiments with Hydra, Lightning and Weights & Biases."""

from kdexp.core.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
