"""Reader of Gemma Scope folders (`params.npz`, Google DeepMind's JumpReLU SAEs for Gemma 2) into native tensors.

A release folder is `<repo>/layer_<L>/width_<W>/average_l0_<N>/params.npz` in repos such as
`google/gemma-scope-2b-pt-res` (residual stream), `-mlp` (MLP output) and `-att` (attention heads concatenated,
TransformerLens' `attn.hook_z`). The archive holds `W_enc [d, F]`, `W_dec [F, d]`, `b_enc [F]`, `b_dec [d]` and a
per-feature `threshold [F]`. The forward, from the Gemma Scope tutorial (Lieberum et al. 2024, "Gemma Scope",
arXiv:2408.05147, and its Colab's `JumpReLUSAE`) and SAELens' `gemma_2_sae_huggingface_loader`
(`apply_b_dec_to_input: False`):

    pre = x @ W_enc + b_enc                    (no b_dec subtracted first)
    f   = (pre > threshold) * ReLU(pre)        (..., F)
    x_hat = f @ W_dec + b_dec                  (..., d)

which is the native jumprelu kind without a pre-encoder bias. The model and hook point are read from the
folder's path (the repo name `gemma-scope-<size>-<pt|it>-<res|mlp|att>`, also inside an HF cache path, and
`layer_<L>`); an unrecognised path leaves them unset.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dictionaries.errors import FormatError
from dictionaries.files import require
from dictionaries.foreign_formats import Foreign, Layout, check_layout
from dictionaries.hookpoints import saelens_hook

GEMMA_SCOPE_LAYOUT: Layout = {"W_enc": (("d", "F"), True), "b_enc": (("F",), True), "W_dec": (("F", "d"), True),
                              "b_dec": (("d",), True), "threshold": (("F",), True)}
_REPO = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att|transcoders)")
_SITE_HOOK = {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out", "att": "blocks.{L}.attn.hook_z"}
_WIDTH = re.compile(r"^width_(\d+)([km])$")


def read_gemma_scope(folder: Path, *, architecture: str | None = None) -> Foreign:
    """`params.npz` (numpy arrays; loaded with allow_pickle=False, so no object arrays are ever unpickled)."""
    import numpy as np

    path = require(folder / "params.npz", "Gemma Scope")
    where = folder.resolve().as_posix()
    repo = _REPO.search(where)
    if repo and repo.group(3) == "transcoders":
        raise FormatError(str(path), "a Gemma Scope transcoder reconstructs the MLP's output from its input; "
                                     "native dictionaries reconstruct what they read")
    if "embedding" in folder.resolve().parts:
        raise FormatError(str(path), "Gemma Scope's embedding SAEs were trained on the embedding before Gemma's "
                                     "sqrt(d_model) scale; no hook point of the model carries that tensor")
    try:
        with np.load(path, allow_pickle=False) as data:
            # some archives spell the matrices w_enc / w_dec (SAELens renames them the same way)
            state = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])) for k in data}
    except (OSError, ValueError) as e:
        raise FormatError(str(path), f"not a readable numpy .npz archive ({e})") from None
    dims = check_layout(state, GEMMA_SCOPE_LAYOUT, path)
    state = {k: v.to(torch.float32) if not v.is_floating_point() else v for k, v in state.items()}
    found = Foreign("jumprelu", state, None, False, path, [path])
    width = next((_WIDTH.match(p) for p in folder.resolve().parts if _WIDTH.match(p)), None)
    if width and dims["F"] != int(width.group(1)) * {"k": 1024, "m": 1024 ** 2}[width.group(2)]:
        found.notes.append(f"folder says {width.group(0)} but the archive holds {dims['F']} features")
    layer = next((int(p[6:]) for p in folder.resolve().parts if re.fullmatch(r"layer_\d+", p)), None)
    l0 = next((p[11:] for p in folder.resolve().parts if re.fullmatch(r"average_l0_\d+", p)), None)
    if l0:  # the release names each folder by the average L0 its authors measured
        found.notes.append(f"average L0 {l0} as reported by the release (folder name)")
    if repo:
        size, tuned, site = repo.groups()
        found.model = f"google/gemma-2-{size}" + ("-it" if tuned == "it" else "")
        if layer is not None:
            hook_name = _SITE_HOOK[site].format(L=layer)
            found.hook = saelens_hook(found.model, hook_name)
            found.notes.append(f"Gemma Scope {repo.group(0)}, hook {hook_name} (from the folder path)")
    if found.hook is None:
        found.notes.append("model or layer not in the folder path (expected .../gemma-scope-2b-pt-res/layer_L/...): "
                           "set card.model and card.hook by hand")
    return found
