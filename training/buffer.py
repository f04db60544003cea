"""The shuffling activation buffer on the training device, shared by every dictionary of one run.

The buffer holds `capacity` token rows; row i holds token i's activation at every hook (one tensor
(capacity, d_h) per hook, all hooks sharing one row order, so dictionaries at different hooks see the same
tokens). Batches are read along a seeded permutation of the rows; once half of them have been read the
read rows are overwritten with fresh activations and a new permutation of all rows is drawn (Marks &
Mueller 2023's "refresh when half used"). Each harvested activation is read exactly once; no permutation
is drawn per batch, only one `randperm(capacity)` per refill.

Checkpoints hold the permutation, the read position, the unread rows and the harvested rows waiting to be
placed (`pending`), plus the generator state. Resume means: the buffer continues with exactly the rows it
would have read, and the stream continues from the position after the last harvest, so a resumed run
reads the same batches as an uninterrupted one. The cost is that a checkpoint stores the unread half or
more of the buffer (capacity/2 * sum(d_h) floats at least).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Harvest = Callable[[], "list[Tensor] | None"]  # next chunk of rows per hook, (m, d_h) each; None at the end


class ActivationBuffer:
    """Rows of activations at several hooks, read in shuffled batches, half refilled from `harvest`."""

    def __init__(self, harvest: Harvest, dims: Sequence[int], capacity: int, *, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.harvest = harvest
        self.dims = list(dims)
        self.capacity = capacity
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.data = [torch.zeros(capacity, d, device=self.device, dtype=dtype) for d in self.dims]
        self.order = torch.arange(0, device=self.device)  # rows in reading order (valid rows only)
        self.pos = 0                                      # rows of `order` already read
        self.pending: list[Tensor] = [torch.zeros(0, d, device=self.device, dtype=dtype) for d in self.dims]
        self.started = False
        self.refills = 0

    # ---- reading -----------------------------------------------------------------------------------
    def next_batch(self, n: int) -> list[Tensor] | None:
        """n rows per hook, (n, d_h) each; None when the data has run out before n more unread rows."""
        if not self.started:
            self._refill(torch.arange(self.capacity, device=self.device), fresh=True)
        elif self.pos >= self.capacity // 2 or self.pos + n > len(self.order):
            self._refill(self.order[: self.pos], fresh=False)
        if self.pos + n > len(self.order):
            return None
        idx = self.order[self.pos: self.pos + n]
        self.pos += n
        return [d[idx] for d in self.data]

    @property
    def unread(self) -> int:
        """Rows not yet read."""
        return len(self.order) - self.pos

    def _place(self, slots: Tensor) -> int:
        """Write fresh rows (pending ones first, then new harvests) into `slots`; return how many were written."""
        filled = 0
        while filled < len(slots):
            if len(self.pending[0]) == 0:
                chunk = self.harvest()
                if chunk is None:
                    break
                self.pending = [c.to(self.device, d.dtype) for c, d in zip(chunk, self.data)]
            m = min(len(self.pending[0]), len(slots) - filled)
            for d, p in zip(self.data, self.pending):
                d[slots[filled: filled + m]] = p[:m]
            self.pending = [p[m:] for p in self.pending]
            filled += m
        return filled

    def _refill(self, slots: Tensor, *, fresh: bool) -> None:
        """Overwrite the rows at `slots` with fresh activations and draw a new permutation of the valid rows."""
        got = self._place(slots)
        if got == len(slots) and (fresh or len(self.order) == self.capacity):
            valid = torch.arange(self.capacity, device=self.device)  # the usual case: every row holds data
        else:  # the data ran out: only the unread rows and what could still be harvested remain
            valid = slots[:got] if fresh else torch.cat([self.order[self.pos:], slots[:got]])
            valid = valid.sort().values
        perm = torch.randperm(len(valid), generator=self.generator).to(self.device)
        self.order = valid[perm]
        self.pos = 0
        self.started = True
        self.refills += 1

    # ---- random inputs for resampling ----------------------------------------------------------------
    def sample(self, n: int, hook: int = 0, generator: torch.Generator | None = None) -> Tensor:
        """n random unread rows (with replacement) at one hook, (n, d_h); `generator` keeps callers independent."""
        if not self.started:
            self._refill(torch.arange(self.capacity, device=self.device), fresh=True)
        low = self.pos if self.unread > 0 else 0
        pick = torch.randint(low, len(self.order), (n,), generator=generator).to(self.device)
        return self.data[hook][self.order[pick]]

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Permutation, read position, the unread rows, pending rows and the generator (CPU tensors)."""
        unread = self.order[self.pos:]
        return {"order": self.order.cpu(), "pos": self.pos, "started": self.started, "refills": self.refills,
                "unread": [d[unread].cpu() for d in self.data], "pending": [p.cpu().clone() for p in self.pending],
                "generator": self.generator.get_state(), "capacity": self.capacity, "dims": self.dims}

    def load_state_dict(self, state: dict) -> None:
        """Restore exactly: unread rows back at their slots (read rows are refilled before they are used)."""
        if state["capacity"] != self.capacity or list(state["dims"]) != self.dims:
            raise ValueError(f"buffer state is for capacity {state['capacity']} and widths {state['dims']}, "
                             f"this buffer has {self.capacity} and {self.dims}")
        self.order = state["order"].to(self.device)
        self.pos = int(state["pos"])
        self.started = bool(state["started"])
        self.refills = int(state["refills"])
        unread = self.order[self.pos:]
        for d, rows in zip(self.data, state["unread"]):
            d.zero_()
            d[unread] = rows.to(self.device, d.dtype)
        self.pending = [p.to(self.device, d.dtype) for p, d in zip(state["pending"], self.data)]
        self.generator.set_state(state["generator"])
