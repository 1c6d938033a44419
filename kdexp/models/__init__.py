"""Model zoo and feature hooks."""

from kdexp.models.features import FeatureHooks
from kdexp.models.linear import Linear
from kdexp.models.zoo import CNN1D, CNN2D, MLP, count_parameters

__all__ = ["CNN1D", "CNN2D", "MLP", "FeatureHooks", "Linear", "count_parameters"]
