"""Where a model's weights live and in what precision: dtype names, device maps, the device inputs go to.

A model too big for one device in fp32 is loaded in bf16/fp16 (`model_dtype`) and/or spread over devices by
a transformers/accelerate `device_map` ("auto", "balanced", "sequential", a device name, or a mapping of
module names to devices; `parse_device_map`). The dictionary keeps its own dtype and device: activations are
cast to them where they are read and cast back where they are written (attachment.py, evaluation, features,
dashboards), so a bf16 model and an fp32 dictionary work together. `device_map` needs `accelerate` (a
dependency of the package; transformers refuses a device map without it).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from dictionaries.errors import InvalidArgumentError

MODEL_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
"""Names a model dtype may be given by (the recipe stores torch's own name: float32, bfloat16, float16)."""

MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""device_map values that let accelerate spread the model over every device it sees (transformers' names)."""


def model_dtype(value: Any) -> torch.dtype:
    """The torch dtype of `value` (None: float32; a name of MODEL_DTYPES or a torch floating dtype);
    InvalidArgumentError listing the names otherwise."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype) and value in MODEL_DTYPES.values():
        return value
    found = MODEL_DTYPES.get(str(value).strip().lower().removeprefix("torch."))
    if found is None:
        raise InvalidArgumentError("model dtype", str(value), "expected fp32, bf16 or fp16 (float32, bfloat16, "
                                                              "float16, or the torch dtype)")
    return found


def dtype_name(value: Any) -> str:
    """The recipe's name of a model dtype given any way `model_dtype` accepts: float32, bfloat16 or float16."""
    return str(model_dtype(value)).removeprefix("torch.")


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device that this machine has; InvalidArgumentError naming what it lacks otherwise
    (torch would fail later, deep inside a model or tensor move, with a message about something else)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError("device", str(device), "expected cpu, cuda, cuda:N (or another torch device "
                                                          "type such as mps)") from None
    if dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu: each says what it has
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if count == 0:
        raise InvalidArgumentError("device", str(device), f"this machine has no {dev.type} device; use cpu")
    if dev.index is not None and dev.index >= count:
        raise InvalidArgumentError("device", str(device), f"this machine has {count} {dev.type} device(s), "
                                                          f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def parse_device_map(value: Any) -> str | dict[str, Any] | None:
    """A device_map for `from_pretrained`: None, a strategy of MAP_STRATEGIES, a device this machine has
    ("cpu", "cuda:1"), or a mapping module name -> device (a dict, or its JSON text from the command line:
    '{"gpt_neox.embed_in": 0, "gpt_neox.layers": 1, ...}'). InvalidArgumentError for anything else, and when
    `accelerate`, which transformers needs for any device map, is not installed."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise InvalidArgumentError("device_map", value, f"not a JSON object ({e.msg})") from None
    if isinstance(value, dict):
        for device in value.values():  # ints are CUDA ordinals; "disk" offloads (accelerate's names)
            if device != "disk":
                resolve_device(f"cuda:{device}" if isinstance(device, int) else device)
        placed: str | dict[str, Any] = value
    elif isinstance(value, str) and value.strip() in MAP_STRATEGIES:
        placed = value.strip()
    elif isinstance(value, (str, torch.device)) and _is_device(value):
        placed = str(resolve_device(value))  # a device this machine has
    else:
        raise InvalidArgumentError("device_map", str(value), f"expected {', '.join(MAP_STRATEGIES)}, a device "
                                                             "(cpu, cuda:0) or a JSON object of module -> device")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise InvalidArgumentError("device_map", str(value), "a device map needs the `accelerate` package: "
                                                             "pip install accelerate")
    return placed


_OFFLOAD: list[str] = []


def offload_folder() -> str:
    """This process's folder for weights a device map sends to "disk" (transformers reads a safetensors
    checkpoint in place and writes there only what it converts, e.g. to another dtype); removed at exit."""
    if not _OFFLOAD:
        import atexit
        import shutil
        import tempfile

        _OFFLOAD.append(tempfile.mkdtemp(prefix="dictionaries-offload-"))
        atexit.register(shutil.rmtree, _OFFLOAD[0], ignore_errors=True)
    return _OFFLOAD[0]


def may_offload(device_map: str | dict[str, Any] | None) -> bool:
    """Whether a parsed device map may put weights on disk: a strategy (when the devices' memory runs out)
    or a mapping that names "disk"."""
    return device_map in MAP_STRATEGIES or (isinstance(device_map, dict) and "disk" in device_map.values())


def _is_device(value: Any) -> bool:
    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def input_device(hf: nn.Module) -> torch.device:
    """The device token ids must be on: that of the input embedding (with a device map, where the first
    block lives), else of the first parameter."""
    embed = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(hf.parameters()).device


def is_dispatched(hf: nn.Module) -> bool:
    """Whether a device map placed the model (transformers records it as `hf_device_map`): then it must not be
    moved as a whole (`.to(device)` would undo the map, and accelerate refuses to move offloaded weights)."""
    return bool(getattr(hf, "hf_device_map", None))
