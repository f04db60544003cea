"""Feature dashboards, the data: every feature's statistics and examples from ONE streaming pass over text.

`DashboardBuilder.add(input_ids, attention_mask)` runs one forward (stopped at the hook) and one encode per
batch and folds the features into fixed-size tables kept on the dictionary's device, so memory does not grow
with the number of tokens:

- per feature: firing count, sum and maximum of its activation, and a histogram over fixed log-spaced bins
  (1e-4 .. 1e4, eight per decade; an activation outside lands in the end bins);
- the `top` strongest activations, each with its window of tokens (`before` before, `after` after) and the
  feature's activation on every token of the window;
- a uniform sample of `samples` firing tokens (reservoir sampling by random priorities: each firing keeps a
  uniform random key and the largest keys stay), with windows too: the site groups them into activation
  quantile bands, so lower activations are shown and not only the maxima.

Both tables are updated by one group-wise selection over the candidates of the batch and the kept entries
(sort by score, then stably by feature: the first K of each feature stay). `finish()` adds what needs only
the weights: the logit lens of every decoder direction (as `features.logit_lens`, batched) and each
feature's nearest features by decoder cosine. `dashboard_site.py` writes the static site from the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dictionaries.errors import FeatureIndexError, MissingFileError
from dictionaries.features import _final_norm
from dictionaries.hooks import check_hook, collect_activations, torch_model
from dictionaries.recipe import HookPoint

if TYPE_CHECKING:
    from dictionaries.architectures import Dictionary

HIST_LO, HIST_PER_DECADE, HIST_BINS = -4.0, 8, 64
"""Activation histogram: bin i covers log10(a) in [HIST_LO + i/8, HIST_LO + (i+1)/8)."""


@dataclass
class Examples:
    """K examples per feature: score (-inf where empty), activation, window token ids (-1 = none), acts."""

    score: Tensor   # (F, K)
    value: Tensor   # (F, K) the feature's activation on the example's token
    ids: Tensor     # (F, K, W) int32
    acts: Tensor    # (F, K, W) float32

    @classmethod
    def empty(cls, features: int, k: int, width: int, device: torch.device) -> Examples:
        return cls(torch.full((features, k), -math.inf, device=device), torch.zeros(features, k, device=device),
                   torch.full((features, k, width), -1, dtype=torch.int32, device=device),
                   torch.zeros(features, k, width, device=device))


@dataclass
class DashboardData:
    """What the site shows, as CPU tensors and lists (features lo..hi of the dictionary)."""

    lo: int
    tokens: int
    count: Tensor
    total: Tensor
    maximum: Tensor
    hist: Tensor
    top: Examples
    samples: Examples
    promoted: tuple[Tensor, Tensor] | None = None      # (ids (F, n), scores (F, n))
    suppressed: tuple[Tensor, Tensor] | None = None
    nearest: tuple[Tensor, Tensor] | None = None       # (feature ids (F, n), cosines (F, n))
    identity: dict[str, Any] = field(default_factory=dict)
    before: int = 8

    @property
    def density(self) -> Tensor:
        return self.count.double() / max(self.tokens, 1)


def keep_first(groups: Tensor, scores: Tensor, n_groups: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(positions, group, rank) of the `k` highest scores of each group among the candidates."""
    order = scores.argsort(descending=True)
    order = order[groups[order].argsort(stable=True)]
    g = groups[order]
    counts = torch.bincount(g, minlength=n_groups)
    rank = torch.arange(g.numel(), device=g.device) - (counts.cumsum(0) - counts)[g]
    keep = rank < k
    return order[keep], g[keep], rank[keep]


class DashboardBuilder:
    """Streams batches through the model and the dictionary, keeping per-feature tables of fixed size."""

    def __init__(self, model: Any, dictionary: Dictionary, *, hook: HookPoint | str | None = None,
                 features: range | None = None, top: int = 12, samples: int = 12, before: int = 8,
                 after: int = 4, seed: int = 0) -> None:
        card = getattr(dictionary, "card", None)
        self.hook = hook if hook is not None else (card.hook if card is not None else None)
        if self.hook is None:
            from dictionaries.errors import HookPointError

            raise HookPointError("<none>", problem="the dictionary's card names no hook point; pass `hook=`.")
        check_hook(model, self.hook, dictionary.d_in)
        self.features = features if features is not None else range(dictionary.d_dict)
        if self.features.start < 0 or self.features.stop > dictionary.d_dict or len(self.features) == 0:
            raise FeatureIndexError(self.features.stop - 1, dictionary.d_dict)
        self.model, self.dictionary, self.before, self.after = model, dictionary, before, after
        self.device = dictionary.W_enc.device
        n, width = len(self.features), before + 1 + after
        self.tokens = 0
        self.count = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.total = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.hist = torch.zeros(n * HIST_BINS, dtype=torch.int64, device=self.device)
        self.top = Examples.empty(n, top, width, self.device)
        self.samples = Examples.empty(n, samples, width, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The features (batch, pos, n) of the chosen range, zero on padding: one forward, one encode."""
        model_device = next(torch_model(self.model).parameters()).device
        [x] = collect_activations(self.model, [self.hook], input_ids.to(model_device), attention_mask.to(model_device))
        with torch.no_grad():
            f = self.dictionary.encode(x.to(self.device, self.dictionary.W_enc.dtype))
        f = f[..., self.features.start:self.features.stop] if len(self.features) != f.shape[-1] else f
        if bool(attention_mask.all()):  # packed text has no padding: spare a full copy of f
            return f.float()
        return f.float() * attention_mask.to(self.device)[..., None]

    @torch.no_grad()
    def add(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Fold one batch of contexts (batch, pos) into the tables."""
        f = self.encode(input_ids, attention_mask)
        self.tokens += int(attention_mask.sum())
        n = f.shape[-1]
        # One scan of the flat features: 1-D nonzero and a flat gather are several times cheaper than the
        # (B, T, n) nonzero and a 3-index gather; row, position and feature come back by integer division.
        flat = f.reshape(-1)
        where = flat.gt(0).nonzero().squeeze(1)                       # (m,) flat (row * T + pos) * n + feature
        value = flat.index_select(0, where)
        c, bp = where % n, where // n
        b, p = bp // f.shape[1], bp % f.shape[1]
        self.count += torch.bincount(c, minlength=n)
        self.total.index_add_(0, c, value.double())
        bins = ((value.log10() - HIST_LO) * HIST_PER_DECADE).floor().clamp(0, HIST_BINS - 1).long()
        self.hist += torch.bincount(c * HIST_BINS + bins, minlength=n * HIST_BINS)
        ids = input_ids.to(self.device).masked_fill(attention_mask.to(self.device) == 0, -1)
        windows = _Windows(ids, f, self.before, self.after)
        keys = torch.rand(value.shape, generator=self.generator, device=self.device)
        self.top = self._merge(self.top, c, value, value, b, p, windows)
        self.samples = self._merge(self.samples, c, keys, value, b, p, windows)

    def _merge(self, table: Examples, c: Tensor, score: Tensor, value: Tensor, b: Tensor, p: Tensor,
               windows: _Windows) -> Examples:
        """The table with the best of (its entries, this batch's candidates) by `score`, K per feature."""
        n, k = table.score.shape
        enters = (score > table.score[:, -1].index_select(0, c)).nonzero().squeeze(1)  # beaten by a full table's
        if enters.numel() == 0:                                                          # K-th entry: cannot get in
            return table
        if enters.numel() < c.numel():  # one index list for the five (a boolean mask would search five times)
            c, score, value, b, p = (t.index_select(0, enters) for t in (c, score, value, b, p))
        held = (table.score > -math.inf).flatten().nonzero().squeeze(1)           # flat (feature * K + slot)
        groups = torch.cat([held // k, c])
        kept, g, rank = keep_first(groups, torch.cat([table.score.flatten()[held], score]), n, k)
        out = Examples.empty(n, k, table.ids.shape[-1], self.device)
        old = kept < held.numel()
        src = held[kept[old]]
        out.score[g[old], rank[old]] = table.score.flatten()[src]
        out.value[g[old], rank[old]] = table.value.flatten()[src]
        out.ids[g[old], rank[old]] = table.ids.flatten(0, 1)[src]
        out.acts[g[old], rank[old]] = table.acts.flatten(0, 1)[src]
        new = kept[~old] - held.numel()
        gn, rn = g[~old], rank[~old]
        out.score[gn, rn], out.value[gn, rn] = score[new], value[new]
        out.ids[gn, rn], out.acts[gn, rn] = windows.take(b[new], p[new], c[new])
        return out

    @torch.no_grad()
    def finish(self, lens: int = 10, nearest: int = 8, block: int = 1024) -> DashboardData:
        """The tables on the CPU, with the logit lens and the nearest features (weights only)."""
        maximum = self.top.score[:, 0].clamp_min(0).nan_to_num(0.0, neginf=0.0)
        cpu = lambda e: Examples(*(t.cpu() for t in (e.score, e.value, e.ids, e.acts)))  # noqa: E731
        data = DashboardData(self.features.start, self.tokens, self.count.cpu(), self.total.float().cpu(),
                             maximum.cpu(), self.hist.view(-1, HIST_BINS).cpu(), cpu(self.top),
                             cpu(self.samples), before=self.before)
        w = self.dictionary.W_dec[self.features.start:self.features.stop].detach()
        data.promoted, data.suppressed = batched_logit_lens(self.model, w, top=lens, block=block)
        data.nearest = nearest_features(self.dictionary.W_dec.detach(), self.features, top=nearest, block=block)
        return data


class _Windows:
    """Windows of token ids and feature activations around (row, pos) positions of one batch.

    Only the few candidates that enter a table are gathered, straight from f (B, T, n): padding f itself would
    copy the whole batch's features for every batch.
    """

    def __init__(self, ids: Tensor, f: Tensor, before: int, after: int) -> None:
        self.before, self.width, self.ids, self.f = before, before + 1 + after, ids, f

    def take(self, b: Tensor, p: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        pos = p[:, None] + torch.arange(-self.before, self.width - self.before, device=p.device)   # (m, W)
        inside = (pos >= 0) & (pos < self.ids.shape[1])
        at = pos.clamp(0, self.ids.shape[1] - 1)
        ids = self.ids[b[:, None], at].masked_fill(~inside, -1).int()
        acts = self.f[b[:, None], at, c[:, None]] * inside
        return ids, acts


def batched_logit_lens(model: Any, directions: Tensor, *, top: int = 10, block: int = 1024
                       ) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """`features.logit_lens` of many directions (F, d): ((ids, scores) promoted, (ids, scores) suppressed)."""
    hf = torch_model(model)
    unembed = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if unembed is None or getattr(unembed, "in_features", None) != directions.shape[-1]:
        return None, None
    norm = _final_norm(hf)
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for start in range(0, directions.shape[0], block):
        d = directions[start:start + block].to(unembed.weight.device, unembed.weight.dtype)[:, None]  # (b, 1, d)
        logits = unembed(norm(d) if norm is not None else d)[:, 0].float()                          # (b, vocab)
        k = min(top, logits.shape[-1])
        hi, lo = logits.topk(k), (-logits).topk(k)
        parts.append((hi.indices.cpu(), hi.values.cpu(), lo.indices.cpu(), -lo.values.cpu()))
    cat = [torch.cat(t) for t in zip(*parts)]
    return (cat[0], cat[1]), (cat[2], cat[3])


def nearest_features(w_dec: Tensor, features: range, *, top: int = 8, block: int = 1024) -> tuple[Tensor, Tensor]:
    """For each feature in the range: the `top` other features with the highest decoder cosine (ids, cosines)."""
    unit = torch.nn.functional.normalize(w_dec.float(), dim=-1)
    k = min(top, unit.shape[0] - 1)
    ids, cos = [], []
    for start in range(features.start, features.stop, block):
        stop = min(start + block, features.stop)
        sim = unit[start:stop] @ unit.T                                             # (b, F)
        sim[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf      # not itself
        best = sim.topk(k)
        ids.append(best.indices.cpu())
        cos.append(best.values.cpu())
    return torch.cat(ids), torch.cat(cos)


# ---- text in, batches out ----------------------------------------------------------------------------
def read_source(source: str | Path) -> Iterator[str]:
    """Texts from a .txt file (paragraphs split at blank lines), a folder of .txt files, a .jsonl file
    (its "text" field), or a `datasets` id (streamed, its "text" column)."""
    path = Path(source)
    if path.is_dir():
        for p in sorted(path.rglob("*.txt")):
            yield from read_source(p)
    elif path.suffix == ".jsonl" and path.is_file():
        import json

        with path.open(encoding="utf-8") as fh:
            yield from (json.loads(line)["text"] for line in fh if line.strip())
    elif path.is_file():
        yield from (t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip())
    elif path.suffix in (".txt", ".jsonl") or str(source).startswith((".", "/")):
        raise MissingFileError(str(path), "Pass a text file, a folder of .txt files, or a dataset id.")
    else:
        from datasets import load_dataset

        yield from (row["text"] for row in load_dataset(str(source), split="train", streaming=True))


def token_batches(tokenizer: Any, texts: Iterable[str], *, tokens: int, context_length: int = 128,
                  batch_size: int = 16) -> Iterator[tuple[Tensor, Tensor]]:
    """(input_ids, attention_mask) batches of contexts: each text cut into pieces of `context_length` tokens
    (the last one right-padded), until `tokens` real tokens are given."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[int]] = []
    given = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), context_length):
            piece = ids[start:start + context_length][: tokens - given]
            if piece:
                rows.append(piece)
                given += len(piece)
            if len(rows) == batch_size or given >= tokens:
                yield _pad(rows, pad, context_length)
                rows = []
            if given >= tokens:
                return
    if rows:
        yield _pad(rows, pad, context_length)


def _pad(rows: list[list[int]], pad: int, length: int) -> tuple[Tensor, Tensor]:
    width = min(length, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def build_dashboard(model: Any, dictionary: Dictionary, batches: Iterable[tuple[Tensor, Tensor]], *,
                    progress: bool = True, **options: Any) -> DashboardData:
    """One pass over `batches` ((input_ids, attention_mask) pairs); `options` go to DashboardBuilder."""
    from tqdm.auto import tqdm

    builder = DashboardBuilder(model, dictionary, **options)
    for ids, mask in tqdm(batches, desc="dashboard", unit="batch", disable=not progress):
        builder.add(ids, mask)
    data = builder.finish()
    data.identity = identity(dictionary)
    return data


def identity(dictionary: Dictionary) -> dict[str, Any]:
    """The card's identity as the site shows it: name, model, hook point, architecture, sizes, links."""
    card = getattr(dictionary, "card", None)
    if card is None:
        return {"name": type(dictionary).__name__, "d_in": dictionary.d_in, "d_dict": dictionary.d_dict}
    return {"name": card.name, "architecture": card.architecture, "d_in": card.d_in, "d_dict": card.d_dict,
            "model": card.model.id if card.model else None,
            "hook": f"{card.hook.module}:{card.hook.io}" if card.hook else None,
            "neuronpedia": card.links.neuronpedia, "paper": card.links.paper}
