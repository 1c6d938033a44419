"""Capture intermediate activations by module path with forward hooks.

Any ``nn.Module`` (ours, torchvision's, Hugging Face's) can then serve as teacher
or student for feature objectives without returning feature tuples.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdexp.core.errors import ConfigError


def tap_points(model: nn.Module) -> dict[str, str]:
    """Every name a tap may use → the submodule path it hooks: the module paths themselves, plus
    the model's ``tap_aliases`` (e.g. ``blocks.3`` for a Hugging Face model's fourth layer)."""
    points = {name: name for name, _ in model.named_modules() if name}
    points.update(getattr(model, "tap_aliases", None) or {})
    return points


class FeatureHooks:
    """Records the outputs of the named submodules on every forward pass."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        points = tap_points(model)
        for path in paths:
            if path not in points:
                available = ", ".join(sorted(points)) or "(none)"
                raise ConfigError(f"no submodule '{path}' in {type(model).__name__}; available: {available}")
            module = model.get_submodule(points[path])
            self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor | tuple) -> None:
            # Some layers (Hugging Face's, in older releases) return (hidden states, extras...).
            self.features[path] = output[0] if isinstance(output, tuple) else output

        return hook

    def pop(self) -> dict[str, Tensor]:
        """Features of the last forward pass; clears them so none leak into the next."""
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
