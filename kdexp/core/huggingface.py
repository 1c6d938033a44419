"""What Hugging Face models (:mod:`kdexp.models.hf`) and tokenizers (:mod:`kdexp.data.tokenizer`)
share: importing ``transformers`` quietly, and telling a local directory from a hub name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdexp.core.config import is_interactive
from kdexp.core.errors import ConfigError

TEXT_EXTRA = "pip install -e '.[text]'"


def import_transformers(needed_by: str, alternative: str = "") -> Any:
    """``transformers``, with its own warnings and (off a terminal) progress bars silenced; a clear
    error naming ``needed_by`` (and ``alternative``, a way around it) when it is not installed."""
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(f"{needed_by} needs the transformers package: {TEXT_EXTRA}{alternative}.") from err
    transformers.logging.set_verbosity_error()  # its config warnings are ours to raise, in our words
    if not is_interactive():  # "Loading weights" bars in logs and CI output are noise
        transformers.utils.logging.disable_progress_bar()
    return transformers


def is_local_path(name: str) -> bool:
    """Whether ``name`` names a directory rather than a hub repository ("org/name" is a hub name)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or Path(name).expanduser().exists()
