"""Names the package agrees on, each written once: file names, environment variables, endpoints, defaults."""

from __future__ import annotations

# ---- a native dictionary folder (DESIGN.md section 5) -----------------------------------------------
CARD_FILE = "card.json"
"""The card of a native folder."""
WEIGHTS_FILE = "weights.safetensors"
"""The weights of a native folder, under native tensor names."""
README_FILE = "README.md"
"""The Hub model card staged beside a published folder."""
DENSITY_FILE = "density.safetensors"
"""Per-feature firing frequency written by evaluation (tensor `frequency`, float32 (F,))."""
DENSITY_PNG = "density.png"
"""The feature density histogram written by evaluation."""
SENSITIVITY_PNG = "sensitivity.png"
"""The sensitive-directions plot written by evaluation."""

# ---- environment variables ----------------------------------------------------------------------------
ENV_REGISTRY = "DICTIONARIES_REGISTRY"
"""Path of a registry.yaml to use instead of the one shipped with the package."""
ENV_LOCAL_HUB = "DICTIONARIES_LOCAL_HUB"
"""Root of a local hub (olah mirrors) that publishing commits into instead of the Hub."""
ENV_DEBUG = "DICTIONARIES_DEBUG"
"""`1` makes the CLI show tracebacks instead of one-line errors."""
ENV_HUB_TIMEOUT = "DICTIONARIES_HUB_TIMEOUT"
"""Seconds to wait for the Hub (or a plain HTTPS server) to connect or answer, instead of HUB_TIMEOUT."""

# ---- the Hugging Face Hub -------------------------------------------------------------------------
DEFAULT_ENDPOINT = "https://huggingface.co"
"""The Hub's endpoint when HF_ENDPOINT is unset."""
HUB_TIMEOUT = 10.0
"""Seconds to wait for a Hub (or plain HTTPS) server to connect or answer before saying it is unreachable
(huggingface_hub's own default, DEFAULT_ETAG_TIMEOUT, is 10 s too)."""
CACHE_SUBDIR = "dictionaries"
"""Folder under HF_HOME for what the HF cache cannot hold: plain-URL files, zip members, verification records."""
