"""Activations from many hook points in one forward pass, stopping after the deepest, as token rows.

Built on `dictionaries.hooks.collect_activations` (plain torch hooks): one no-grad forward saves every
requested hook's activation (batch, pos, d_h) and stops after the deepest module. Here the positions that
are not real training tokens are dropped, leaving rows (n_tokens, d_h) per hook, all hooks dropping the
same positions so row i is the same token everywhere:
- pad positions (attention_mask == 0);
- with `exclude_bos`, every position holding the BOS id. Pythia's tokenizer uses one id for BOS and EOS, so
  the EOS separators between packed documents are dropped too; their activations carry the same
  attention-sink outlier norms as a leading BOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dictionaries.hooks import collect_activations, find_hook
from dictionaries.recipe import HookPoint


def token_mask(input_ids: Tensor, attention_mask: Tensor | None, *, bos_id: int | None,
               exclude_bos: bool) -> Tensor:
    """(batch, pos) bool: the positions whose activations are training rows."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if exclude_bos and bos_id is not None:
        keep &= input_ids != bos_id
    return keep


class Harvester:
    """Turns token contexts into activation rows at several hook points with one forward each."""

    def __init__(self, model: Any, hooks: Sequence[HookPoint], *, bos_id: int | None, exclude_bos: bool,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.hooks = list(hooks)
        self.bos_id = bos_id
        self.exclude_bos = exclude_bos
        self.device = torch.device(device)
        for hook in self.hooks:  # a hook point the model lacks fails here, before any training
            find_hook(model, hook)
        self.dims = [x.shape[-1] for x in self._collect(torch.tensor([[2, 3]], device=self.device), None)]

    def _collect(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        return collect_activations(self.model, self.hooks, input_ids, attention_mask)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Rows (n_tokens, d_h) per hook for contexts (batch, pos), pad (and BOS if asked) dropped."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        keep = token_mask(input_ids, attention_mask, bos_id=self.bos_id, exclude_bos=self.exclude_bos)
        acts = self._collect(input_ids, attention_mask)
        return [a[keep.to(a.device)] for a in acts]  # with a device map, a hook's module may be on another device


def harvest_chunks(harvester: Harvester, next_contexts: Callable[[int], Tensor],
                   contexts_per_forward: int) -> Callable[[], list[Tensor] | None]:
    """A `buffer.Harvest`: each call reads up to `contexts_per_forward` contexts and returns their rows."""

    def chunk() -> list[Tensor] | None:
        contexts = next_contexts(contexts_per_forward)
        if len(contexts) == 0:
            return None
        return harvester(contexts)

    return chunk

