"""The sensitive-directions test (Apollo 2024, DESIGN.md section 6) and its plot.

Heimersheim, Mendel et al. (Apollo Research, 2024, "activation plateaus"): a real activation x sits on a
plateau of the model's output; moving it toward (a) a random point drawn from a Gaussian with the
activations' mean and covariance changes the output slowly, while moving it toward (b) another real
activation, or (c) along a feature direction a dictionary found, changes it sooner. We perturb
x -> x + t * u at one position and record KL(p_clean || p_perturbed) of the next-token distribution at
that same position (the final logits there), for steps t on a grid.

Protocol as in seed 002: 10-token sequences, perturbed and read at their last position only; the pool that
gives the random kind's mean and covariance and the real kind's targets holds activations at that same
position; for LayerNorm models every vector is centred along the hidden dimension (TransformerLens does so,
and the all-ones direction is invisible to later layers). Apollo ran it at the residual stream
(blocks.1.hook_resid_pre); the card's figure is measured at the dictionary's own hook point.

Normalisation (so that steps compare across kinds): every direction u is rescaled to the norm of its
(centred) base activation, so t = 1 means "moved by one activation norm" whatever the kind.
Per base activation we interpolate linearly the first step where the KL reaches 0.5 (inf if it never
does on the grid); the card stores the median over base activations for each kind.

The perturbed forwards themselves (whole contexts, or the last token over a cached prefix with the blocks
before the hook run once per base) live in perturbation.py; here the directions, the curves and the plot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dictionaries.files import write_atomic
from training.perturbation import curves_from_prefix, curves_full, prefix_cache

if TYPE_CHECKING:
    from dictionaries.architectures import Dictionary
    from dictionaries.card import Sensitivity
    from dictionaries.recipe import HookPoint

POOL_SIZE = 4096
"""Real activations kept per hook for the random kind's mean/covariance and the real kind's targets."""
APOLLO_LENGTH = 10
"""Tokens per sequence, perturbed and read at the last one (Apollo 2024 used 10-token openwebtext sequences)."""
LOGITS_BUDGET = 16 << 20
"""Bytes of float32 logits one perturbed forward may produce (Pythia-70m: 83 one-token rows, so 3 bases x 21 steps).
Its log-softmax, the clean rows repeated beside it and the KL's products are each as large again; at 1 GiB the
test added ~790 MB to a training run's peak, at this size ~20 MB, for a few more forwards of the last token."""
KL_THRESHOLD = 0.5
"""The KL (nats) at which a perturbation counts as having changed the output."""


@dataclass
class SensitivityCurves:
    """KL against step for each direction kind, for one dictionary."""

    steps: Tensor
    """(S,) steps t, in units of the base activation's norm."""
    kl: dict[str, Tensor] = field(default_factory=dict)
    """kind ("random", "real", "dictionary") -> (N, S) KL(clean || perturbed) in nats."""

    def crossings(self) -> dict[str, Tensor]:
        """kind -> (N,) step where each base's KL first reaches 0.5 (inf if never)."""
        return {kind: crossing_steps(self.steps, kl) for kind, kl in self.kl.items()}

    def medians(self) -> dict[str, float]:
        """kind -> median over base activations of the step where KL reaches 0.5."""
        return {kind: float(c.median().item()) if c.numel() % 2 else _even_median(c)
                for kind, c in self.crossings().items()}

    def to_card(self) -> Sensitivity:
        """The card's Sensitivity figures."""
        from dictionaries.card import Sensitivity

        m = self.medians()
        n = next(iter(self.kl.values())).shape[0] if self.kl else 0
        return Sensitivity(random=m.get("random"), real=m.get("real"), dictionary=m.get("dictionary"), samples=n,
                           max_step=float(self.steps.max()))


def _even_median(c: Tensor) -> float:
    """Median of an even-sized vector as the mean of the two middle values (inf stays inf)."""
    s = c.double().sort().values
    mid = s.numel() // 2
    return float(((s[mid - 1] + s[mid]) / 2).item())


def crossing_steps(steps: Tensor, kl: Tensor, threshold: float = KL_THRESHOLD) -> Tensor:
    """(N,) first step at which each row of kl (N, S) reaches `threshold`, linearly interpolated; inf if never."""
    kl = kl.double()
    t = steps.double().to(kl.device)
    reached = kl >= threshold                                          # (N, S)
    first = torch.where(reached.any(1), reached.float().argmax(1), torch.full_like(reached[:, 0], -1, dtype=torch.long))
    out = torch.full((kl.shape[0],), math.inf, dtype=torch.float64)
    for i, s in enumerate(first.tolist()):
        if s < 0:
            continue
        if s == 0:
            out[i] = t[0]
            continue
        k0, k1 = kl[i, s - 1], kl[i, s]
        out[i] = t[s - 1] + (threshold - k0) / (k1 - k0) * (t[s] - t[s - 1])
    return out


def sample_like(activations: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points (n, d) from the Gaussian with the mean and covariance of `activations` (M, d).

    Uses the eigendecomposition of the (float64) covariance so a rank-deficient covariance still works.
    """
    a = activations.double()
    mean = a.mean(0)                                                   # (d,)
    cov = torch.cov(a.T)                                               # (d, d)
    evals, evecs = torch.linalg.eigh(cov)
    scale = evecs * evals.clamp_min(0).sqrt()                          # (d, d): cov = scale @ scale.T
    z = torch.randn(n, a.shape[1], generator=generator, dtype=torch.float64)
    return (mean + z @ scale.T).to(activations.dtype)


def _unit_to_norm(direction: Tensor, base: Tensor) -> Tensor:
    """Rescale each row of direction (N, d) to the norm of the matching base activation (N, d)."""
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * base.norm(dim=-1, keepdim=True)


def _centred(v: Tensor) -> Tensor:
    """Each row of v (..., d) minus its mean over d."""
    return v - v.mean(-1, keepdim=True)


def dictionary_directions(dictionary: Dictionary, base: Tensor) -> Tensor:
    """(N, d) decoder direction of each base activation's most active feature (largest f_i * ||W_dec_i||)."""
    with torch.no_grad():
        x = base.to(dictionary.W_dec.dtype).to(dictionary.W_dec.device)
        f = dictionary.encode(x)                                       # (N, F)
        norms = dictionary.W_dec.norm(dim=-1)                          # (F,)
        score = torch.where(f.any(-1, keepdim=True), f * norms, dictionary.pre_activation(x))
        top = score.argmax(-1)                                         # (N,)
        return dictionary.W_dec[top].to(base.dtype).to(base.device)


def measure_sensitivity(model, hook: HookPoint, dictionaries: Sequence[Dictionary], contexts: Tensor,
                        positions: Tensor, pool: Tensor, *, attention_mask: Tensor | None = None,
                        steps: Tensor | None = None, seed: int = 0, rows_per_forward: int | None = None,
                        centre: bool = False, progress: bool = True, reuse_prefix: bool = True,
                        skip_before_hook: bool = True) -> list[SensitivityCurves]:
    """The test at one hook: curves for random and real directions (shared) and for each dictionary.

    contexts (N, P) token ids, each perturbed at positions[i]; pool (M, d) real activations at the hook (the
    mean/covariance of the random kind and the targets of the real kind). `centre` removes each vector's mean
    along d (pool, base and directions), as Apollo's TransformerLens activations had it. rows_per_forward
    defaults to what keeps one forward's logits under LOGITS_BUDGET bytes. `reuse_prefix` (where every
    position is the last and nothing is padded, as in Apollo's protocol): the unperturbed prefix runs once
    per base and each perturbed forward runs the last token alone over its KV cache; otherwise (or for a
    model without a cache) every perturbed forward runs the whole context. `skip_before_hook` (with the
    prefix): the blocks wholly before the hook run once per base, not per perturbed copy (perturbation.py says
    where this holds). All give the same KLs.
    """
    from tqdm.auto import tqdm

    from dictionaries.hooks import collect_activations, torch_model

    steps = torch.linspace(0, 4, 21) if steps is None else steps.float()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 50304
    gen = torch.Generator().manual_seed(seed)
    n, length = contexts.shape
    with torch.no_grad():
        acts = collect_activations(model, [hook], contexts, attention_mask)[0]
        base = acts[torch.arange(n), positions.to(acts.device)].float().cpu()        # (N, d)
    c = _centred if centre else (lambda v: v)
    pool, centred_base = c(pool.float()), c(base)
    others = torch.randint(0, pool.shape[0], (n,), generator=gen)
    directions = {"random": _unit_to_norm(sample_like(pool, n, gen) - centred_base, centred_base),
                  "real": _unit_to_norm(pool[others] - centred_base, centred_base)}
    for j, d in enumerate(dictionaries):
        directions[f"dictionary{j}"] = _unit_to_norm(c(dictionary_directions(d, base).float()), centred_base)
    bar = tqdm(total=len(directions) * n * len(steps), desc=f"sensitivity {hook.module}", unit="run",
               disable=not progress, leave=False)
    unpadded = attention_mask is None or bool(attention_mask.all())
    hf = torch_model(model)
    cache = prefix_cache(hf, contexts) if (reuse_prefix and unpadded and length > 1
                                            and bool((positions == length - 1).all())) else None
    if cache is not None:
        kls = curves_from_prefix(hf, hook, contexts, cache, directions, steps,
                                 rows_per_forward or max(1, LOGITS_BUDGET // (4 * vocab)), bar,
                                 skip_before_hook=skip_before_hook)
    else:
        kls = curves_full(model, hook, contexts, attention_mask, positions, directions, steps,
                          rows_per_forward or max(1, LOGITS_BUDGET // (4 * vocab * length)), bar)
    bar.close()
    shared = {"random": kls["random"], "real": kls["real"]}
    return [SensitivityCurves(steps, {**shared, "dictionary": kls[f"dictionary{j}"]})
            for j in range(len(dictionaries))]


def apollo_windows(batches, *, bos_id: int | None, exclude_bos: bool, length: int = APOLLO_LENGTH
                   ) -> tuple[Tensor, Tensor]:
    """Short sequences as Apollo used them: every `length`-token window of the eval contexts whose tokens are
    all real and whose last token is counted (not BOS when `exclude_bos`); (windows (W, length), their count
    of candidate windows per context (C,)). The perturbed and read position is each window's last one."""
    from training.harvest import token_mask

    ids = torch.cat([b[0] for b in batches])                                   # (C, P)
    mask = torch.cat([b[1] if b[1] is not None else torch.ones_like(b[0]) for b in batches]).bool()
    keep = token_mask(ids, mask, bos_id=bos_id, exclude_bos=exclude_bos)       # (C, P)
    cut = ids.shape[1] // length * length
    win = ids[:, :cut].reshape(-1, length)                                     # (C * P // length, length)
    real = mask[:, :cut].reshape(-1, length).all(1) & keep[:, :cut].reshape(-1, length)[:, -1]
    return win[real], real.view(ids.shape[0], -1).sum(1)


def _centring(model) -> bool:
    """Whether the model normalises with LayerNorm, for which the all-ones direction of the residual stream is
    invisible to every later layer (Apollo's TransformerLens activations had that component removed)."""
    from torch import nn

    return any(isinstance(m, nn.LayerNorm) for m in model.modules())


def sensitivity_on_eval_set(model, dicts: Sequence[Dictionary], hooks: Sequence[HookPoint], batches, *,
                            bos_id: int | None, exclude_bos: bool, samples: int = 32, seed: int = 0,
                            progress: bool = True) -> list[SensitivityCurves | None]:
    """The test per hook as Apollo ran it (seed 002): short sequences (APOLLO_LENGTH tokens) cut from the eval
    set, perturbed and read at ONE fixed position (the last); the random kind's mean and covariance, and
    the real kind's targets, come from a pool of activations at that same position only (no BOS or early
    positions, whose outlier norms would dominate the covariance), centred along the hidden dimension for
    LayerNorm models. `samples` bases are drawn with the seed, the pool is the other windows (up to
    POOL_SIZE). None for every dictionary when fewer than 2 windows qualify.
    """
    from dictionaries.hooks import collect_activations

    windows, _ = apollo_windows(batches, bos_id=bos_id, exclude_bos=exclude_bos)
    if len(windows) < 3:
        return [None] * len(dicts)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=gen)
    n = min(samples, len(windows) // 2)
    bases, pool_ids = windows[order[:n]].to(device), windows[order[n:n + POOL_SIZE]].to(device)
    positions = torch.full((n,), windows.shape[1] - 1, dtype=torch.long)
    unique_hooks = list(dict.fromkeys(hooks))
    with torch.no_grad():
        pools = collect_activations(model, unique_hooks, pool_ids)            # each (M, L, d)
    out: list[SensitivityCurves | None] = [None] * len(dicts)
    for hook, acts in zip(unique_hooks, pools):
        members = [j for j, h in enumerate(hooks) if h == hook]
        pool = acts[:, -1].float().cpu()                                       # (M, d): the fixed position only
        curves = measure_sensitivity(model, hook, [dicts[j] for j in members], bases, positions, pool, seed=seed,
                                     centre=_centring(model), progress=progress)
        for j, c in zip(members, curves):
            out[j] = c
    return out


def plot_sensitivity(curves: SensitivityCurves, path: str | Path, *, title: str = "") -> Path:
    """KL against step per kind (median over base activations, shaded 25-75%), log KL axis, 0.5 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = curves.medians()
    colors = {"random": "tab:gray", "real": "tab:orange", "dictionary": "tab:blue"}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    t = curves.steps.numpy()
    for kind, kl in curves.kl.items():
        q = torch.quantile(kl.double().clamp_min(1e-8), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
        ax.plot(t, q[1].numpy(), color=colors.get(kind), label=f"{kind} (step to KL 0.5: {medians[kind]:.3g})")
        ax.fill_between(t, q[0].numpy(), q[2].numpy(), color=colors.get(kind), alpha=0.2)
    ax.axhline(KL_THRESHOLD, color="black", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-5)  # t = 0 has KL 0 (drawn at 1e-8): keep the axis on the measured range
    ax.set_xlabel("step t (direction scaled to the base activation's norm)")
    ax.set_ylabel("KL(clean || perturbed), final position")
    ax.set_title(title or "sensitive directions", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return write_atomic(path, png.getvalue())
