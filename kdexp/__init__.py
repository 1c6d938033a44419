"""kdexp: knowledge-distillation experiments with Hydra, Lightning and Weights & Biases.

The Python API (:mod:`kdexp.api`) is also at the top level: ``kdexp.compose``, ``kdexp.train_run``,
``kdexp.sweep``, ``kdexp.load_records`` and ``kdexp.ablation_table``. It loads on first use, so
``import kdexp`` and the ``kdexp.core`` modules stay free of torch, Lightning and pandas.
"""

from __future__ import annotations

from typing import Any

from kdexp.core.config import register_resolvers

__version__ = "0.1.0"

# Top-level name -> its function in kdexp.api. `kdexp.train` is the module of `python -m kdexp.train`,
# so training is `kdexp.train_run` here (kdexp.api.train).
_API = {"compose": "compose", "train_run": "train", "sweep": "sweep", "load_records": "load_records",
        "ablation_table": "ablation_table"}
__all__ = ["__version__", "ablation_table", "compose", "load_records", "sweep", "train_run"]  # the keys of _API

register_resolvers()


def __getattr__(name: str) -> Any:
    """The API functions, imported on first use (PEP 562)."""
    if name in _API:
        from kdexp import api  # Hydra's app and the sweep code: about a second, so not at `import kdexp`

        return getattr(api, _API[name])
    raise AttributeError(f"module 'kdexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
