"""dictionaries: get, use, regenerate and share pretrained sparse-autoencoder dictionaries.

The public names are imported lazily so that `import dictionaries` (and `dictctl list`) stays fast:
torch, nnsight and huggingface_hub load only when a function that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_dictionary": "dictionaries.loader",
    "attach": "dictionaries.attachment",
    "wrap_model": "dictionaries.attachment",
    "features_of": "dictionaries.features",
    "inspect_feature": "dictionaries.features",
    "load_registry": "dictionaries.registry",
    "Card": "dictionaries.card",
    "Recipe": "dictionaries.recipe",
    "Dictionary": "dictionaries.architectures",
    "build_dictionary": "dictionaries.architectures",
    "read_folder": "dictionaries.formats",
    "write_native": "dictionaries.formats",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dictionaries' has no attribute {name!r}")
