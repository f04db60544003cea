"""The running tallies behind the card's stats, what one forward's segments add to them (CE and KL from logits,
in chunks of contexts so that no full-vocabulary temporary exceeds a fraction of the logits), and the stand-in
for loss recovered where a model has no LM head.

An encoder loaded without its head (BertModel) predicts no tokens, so neither CE nor loss recovered exists.
What is measured instead is how far splicing moves the model's output: per counted token, the relative
change of the final hidden state, ||h_spliced - h_clean|| / ||h_clean||, for the reconstruction and for
zeros at the hook (the same two segments of the same forward that give spliced and zero-ablated CE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dictionaries.card import Stats
from training.density import summarize_density
from training.sensitivity import SensitivityCurves


def has_lm_head(hf: Any) -> bool:
    """Whether the model ends in token logits (its output embeddings exist), so CE can be measured."""
    get = getattr(hf, "get_output_embeddings", None)
    return get is not None and get() is not None


@dataclass
class EvalResult:
    """What `evaluate` measured for one dictionary."""

    name: str
    """The dictionary's card name."""
    stats: Stats
    """The card's stats (source "measured")."""
    density: Tensor
    """(F,) fraction of counted eval tokens on which each feature fired (f > 0)."""
    sensitivity: SensitivityCurves | None
    """KL-against-step curves of the sensitive-directions test, None when not run."""


class Tally:
    """Streaming float64 sums for one dictionary's stats, kept on the activations' device (no per-batch sync)."""

    def __init__(self, d_in: int, d_dict: int):
        self.tokens = 0
        self.d_in, self.d_dict = d_in, d_dict
        self.sums: dict[str, Tensor] | None = None   # sse, l1, l0, m2 (scalars), fired (F,), mean (d,)
        self.ce_spliced = self.ce_zero = self.kl = 0.0
        self.hidden: dict[str, float] | None = None   # a model without an LM head: summed relative changes

    def add_reconstruction(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """Counted rows only: x, x_hat (n, d), f (n, F)."""
        n = x.shape[0]
        if n == 0:
            return
        if self.sums is None:
            z = torch.zeros((), dtype=torch.float64, device=x.device)
            self.sums = {"sse": z, "l1": z, "l0": z, "m2": z, "mean": z.new_zeros(self.d_in),
                         "fired": z.new_zeros(self.d_dict)}
        acc = self.sums
        x, x_hat = x.double(), x_hat.double()
        active = f > 0
        acc["sse"] = acc["sse"] + ((x - x_hat) ** 2).sum()
        acc["l1"] = acc["l1"] + f.abs().sum(dtype=torch.float64)
        acc["l0"] = acc["l0"] + active.sum()
        acc["fired"] = acc["fired"] + active.sum(0)
        # Chan et al. (1979) pairwise update of the running mean and centred sum of squares
        batch_mean = x.mean(0)
        delta = batch_mean - acc["mean"]
        total = self.tokens + n
        acc["m2"] = acc["m2"] + ((x - batch_mean) ** 2).sum() + (delta ** 2).sum() * (self.tokens * n / total)
        acc["mean"] = acc["mean"] + delta * (n / total)
        self.tokens = total

    @property
    def fired(self) -> Tensor:
        """(F,) float64 count of counted tokens on which each feature fired, on the CPU."""
        return self.sums["fired"].cpu() if self.sums is not None else torch.zeros(self.d_dict, dtype=torch.float64)

    def _scalar(self, key: str) -> float:
        return float(self.sums[key]) if self.sums is not None else 0.0

    def stats(self, ce_clean_sum: float, predictions: int, d_in: int, **meta: Any) -> Stats:
        """The Stats of this tally (CE/KL per prediction, reconstruction per token)."""
        n = max(self.tokens, 1)
        p = max(predictions, 1)
        ce_clean, ce_spliced, ce_zero = ce_clean_sum / p, self.ce_spliced / p, self.ce_zero / p
        sse, m2 = self._scalar("sse"), self._scalar("m2")
        fvu = sse / m2 if m2 > 0 else float("nan")
        gap = ce_zero - ce_clean
        fired = self.fired
        downstream: dict[str, Any] = dict(
            ce_clean=ce_clean, ce_spliced=ce_spliced, ce_zero=ce_zero, kl=self.kl / p,
            frac_loss_recovered=(ce_zero - ce_spliced) / gap if gap != 0 else float("nan"))
        if self.hidden is not None:  # no next-token loss to recover: the final hidden state's change instead
            downstream = {"hidden_change_spliced": self.hidden["spliced"] / n, "hidden_change_zero":
                          self.hidden["zero"] / n}
        return Stats(source="measured", mse=sse / (n * d_in), l1=self._scalar("l1") / n, l0=self._scalar("l0") / n,
                     frac_alive=float((fired > 0).double().mean()), fvu=fvu, variance_explained=1 - fvu,
                     density=summarize_density(fired / n), tokens=self.tokens, **downstream, **meta)


def add_hidden_changes(hidden: Tensor, b: int, group: list, tallies: list[Tally], keep: Tensor) -> None:
    """Add each dictionary's relative final-state changes (spliced, zero-ablated) over counted tokens; `hidden`
    holds the segments clean, then per dictionary of `group` spliced and zeroed, `b` rows each."""
    k = keep.to(hidden.device)
    clean = hidden[:b].double()
    norm = clean.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    for s, (j, _) in enumerate(group):
        lo = (1 + 2 * s) * b
        sums = tallies[j].hidden = tallies[j].hidden or {"spliced": 0.0, "zero": 0.0}
        for key, seg in (("spliced", hidden[lo:lo + b]), ("zero", hidden[lo + b:lo + 2 * b])):
            sums[key] += float(((seg.double() - clean).norm(dim=-1) / norm)[k].sum())


def add_losses(logits: Tensor, b: int, group: list, tallies: list[Tally], targets: Tensor, weight: Tensor,
                chunk: int) -> float:
    """Add each dictionary's spliced CE, KL and zero-ablated CE from logits (nseg * B, pos, V) to its tally;
    returns the clean segment's summed CE. targets (B, pos-1) ids, weight (B, pos-1) the counted predictions.

    Log-softmax runs `chunk` contexts at a time, so no (B, pos, V) float32 temporary exists beside the logits
    (the excluded positions are few: they are computed and masked out, not gathered). KL(clean || spliced)
    per position is sum_v p_clean (log p_clean - log p_spliced), the clean model as the reference.
    """
    ce_clean = 0.0
    for lo in range(0, b, chunk):
        rows = slice(lo, min(lo + chunk, b))
        tgt, w = targets[rows], weight[rows]
        lp_clean = _log_probs(logits, b, 0, rows)
        ce_clean += _ce(lp_clean, tgt, w)
        for s, (j, _) in enumerate(group):
            t = tallies[j]
            lp = _log_probs(logits, b, 1 + 2 * s, rows)
            t.ce_spliced += _ce(lp, tgt, w)
            kl = torch.nn.functional.kl_div(lp, lp_clean, reduction="none", log_target=True).sum(-1)
            t.kl += float((kl.double() * w).sum())
            del lp, kl
            t.ce_zero += _ce(_log_probs(logits, b, 2 + 2 * s, rows), tgt, w)
        del lp_clean
    return ce_clean


def _log_probs(logits: Tensor, b: int, segment: int, rows: slice) -> Tensor:
    """(contexts, pos-1, V) log-probs of `rows` (contexts of the batch) in one segment of logits (nseg * B, pos, V)."""
    return torch.log_softmax(logits[segment * b:(segment + 1) * b][rows, :-1].float(), -1)


def _ce(lp: Tensor, targets: Tensor, weight: Tensor) -> float:
    """Summed CE of the counted predictions: lp (n, pos-1, V), targets and weight (n, pos-1)."""
    return -float((_token_log_probs(lp, targets).double() * weight).sum())


def _token_log_probs(lp: Tensor, targets: Tensor) -> Tensor:
    """lp (B, pos, V) log-probs, targets (B, pos) ids -> (B, pos) log-prob of each target."""
    return lp.gather(-1, targets[..., None]).squeeze(-1)
