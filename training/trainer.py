"""Optimisation of one dictionary under a recipe: init, Adam and its schedule, decoder-norm rules,
dead-feature bookkeeping, when to resample (how: training/resampling.py), input normalisation and the
final native module.

`Trainer.step` takes raw activations (B, d_in); everything inside runs on inputs scaled by `input_scale`
(Anthropic 2024's sqrt(d_in) normalisation) and `finish` folds that scale back into the weights. Under
`torch.distributed` each rank steps on its own batch and the trainer all-reduces gradients and batch
statistics itself, so the ranks' modules stay identical.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor

from dictionaries.architectures import ARCHITECTURES, Dictionary
from dictionaries.errors import RecipeError, ShapeMismatchError
from dictionaries.recipe import Recipe
from training.losses import LossContext, compute_loss
from training.presets import resolve
from training.resampling import resample_features
from training.resume import recipe_differences, split_changes

# recipe fields that change the optimisation; a resumed state must agree on all of them (autocast too: it rounds
# every remaining forward, and the card records one precision for the whole run)
_OPTIMISATION_FIELDS = ("architecture", "d_dict", "k", "pre_encoder_bias", "penalty", "optimizer", "decoder_norm",
                        "prune_below", "resampling", "input_normalization", "mse", "seed", "dtype", "autocast",
                        "threshold_decay", "init", "decoder_init_norm", "b_dec_init", "output_hook", "skip")


def _world() -> int:
    """Number of ranks when torch.distributed is initialised, else 0."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce when distributed (sum, max or mean); a no-op on one process."""
    world = _world()
    if world:
        dist = torch.distributed
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= world
    return t


def lr_at(recipe: Recipe, step: int, total_steps: int) -> float:
    """Peak lr times a linear warm-up over warmup_steps and a linear decay to 0 over the last decay_fraction."""
    opt = recipe.optimizer
    factor = min(1.0, (step + 1) / opt.warmup_steps) if opt.warmup_steps else 1.0
    decay_steps = round(opt.decay_fraction * total_steps)
    if decay_steps and step >= total_steps - decay_steps:
        factor *= max(0.0, (total_steps - step) / decay_steps)
    return opt.lr * factor


def init_dictionary(recipe: Recipe, d_in: int, *, dtype: torch.dtype, device: str | torch.device,
                    d_out: int | None = None) -> Dictionary:
    """A module of the recipe's kind: decoder rows random directions of norm `decoder_init_norm`, encoder by `init`.

    tied: W_enc = W_dec^T and b_enc = 0 (Gao et al. 2024; Anthropic, April 2024, with decoder norms 0.1).
    kaiming: W_enc and b_enc drawn as PyTorch's nn.Linear(d_in, d_dict) draws them, uniform in +-1/sqrt(d_in)
    and independent of the decoder (Bricken et al. 2023, seed 004: "the default Pytorch Kaiming Uniform
    initialization"; dictionary_learning's AutoEncoder of 2023, whose decoder columns were normalised Gaussians).
    b_dec starts at 0 (see `Trainer._initialise_decoder_bias`), JumpReLU thresholds at `penalty.initial_threshold`,
    gated r_mag/b_mag at 0 (Rajamanoharan et al. 2024a). A transcoder's decoder rows live in the output space
    (d_out): tied then means W_enc = W_dec^T when d_out = d_in, else encoder columns drawn the same way on their
    own; W_skip starts at 0 (SAELens' SkipTranscoder and sparsify both do).
    """
    d_out = d_out or d_in
    kw = {"pre_encoder_bias": recipe.pre_encoder_bias, "dtype": dtype, "device": device,
          "d_out": d_out, "skip": recipe.skip}
    if recipe.k is not None:
        kw["k"] = recipe.k
    module = ARCHITECTURES[recipe.architecture](d_in, recipe.d_dict, **kw)
    gen = torch.Generator().manual_seed(recipe.seed)
    W_dec = torch.randn(recipe.d_dict, d_out, generator=gen, dtype=torch.float64)        # (F, d_out)
    W_dec *= recipe.decoder_init_norm / W_dec.norm(dim=-1, keepdim=True)
    if recipe.init == "tied":
        rows = W_dec
        if d_out != d_in:  # the encoder's own directions, of the same norm
            rows = torch.randn(recipe.d_dict, d_in, generator=gen, dtype=torch.float64)
            rows *= recipe.decoder_init_norm / rows.norm(dim=-1, keepdim=True)
        W_enc, b_enc = rows.T, torch.zeros(recipe.d_dict, dtype=torch.float64)
    else:  # kaiming: nn.Linear's kaiming_uniform_(a=sqrt(5)) bound and its bias bound are both 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(d_in)
        W_enc = (2 * torch.rand(d_in, recipe.d_dict, generator=gen, dtype=torch.float64) - 1) * bound  # (d, F)
        b_enc = (2 * torch.rand(recipe.d_dict, generator=gen, dtype=torch.float64) - 1) * bound       # (F,)
    with torch.no_grad():
        module.W_dec.copy_(W_dec)
        module.W_enc.copy_(W_enc)
        module.b_enc.copy_(b_enc)
        if recipe.architecture == "jumprelu":
            module.threshold.fill_(recipe.penalty.initial_threshold)
    return module


BF16_TOLERANCE = {"fvu": 0.02, "l0_relative": 0.05, "l0_relative_jumprelu": 0.10}
"""How far a run under bf16 autocast may end from the same run in float32: final FVU within 0.02 (absolute) and
L0 within 5% on held-out activations, 10% for JumpReLU, whose threshold learns only from pre-activations within
one bandwidth of it, where bf16's rounding (2^-8 relative) moves samples across: measured 5.7% on an AVX2 AMD
EPYC, under 5% on the AVX-512 Xeon before it (tests/test_trainer.py checks each recipe family)."""


def _firing(out, batch: int, n_features: int) -> tuple[Tensor, Tensor]:
    """(mean L0, (F,) bool fired) of a step: from the sparse code where the loss kept one, else from f (B, F) read
    as integers of its width (positive floats are positive integers, JumpReLU's -0.0 is not): counting that mask
    is several times faster on CPU than `(f > 0).sum()` (an int64 copy) or a bf16 comparison."""
    if out.code is not None:
        _, features, values = out.code
        fired = torch.zeros(n_features, dtype=torch.bool, device=values.device)
        return (values > 0).sum() / batch, fired.index_fill_(0, features[values > 0], True)
    f = out.features
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[f.element_size()]
    return torch.count_nonzero(f.view(ints) > 0) / batch, f.amax(0) > 0


class Trainer:
    """Trains one dictionary under `recipe` on activations of width d_in, for `total_steps` steps."""

    def __init__(self, recipe: Recipe, d_in: int, *, total_steps: int, device: str | torch.device = "cpu",
                 autocast: torch.dtype | None = None, d_out: int | None = None):
        """`autocast` (e.g. torch.bfloat16; default: the recipe's `autocast`) runs the forward's matmuls at that
        precision; weights, Adam and the backward's accumulation stay in the recipe's dtype (BF16_TOLERANCE)."""
        if total_steps <= 0:
            raise RecipeError(["tokens", "batch_size"], f"training needs at least one step, got {total_steps}")
        recipe = resolve(recipe, d_in)  # d_in-dependent values fixed (penalty.aux_k half_d_in)
        self.recipe, self.d_in, self.total_steps, self.device = recipe, d_in, total_steps, torch.device(device)
        self.dtype = getattr(torch, recipe.dtype)
        self.autocast = autocast or (None if recipe.autocast == "none" else getattr(torch, recipe.autocast))
        self.sparse_decoding = True  # TopK/BatchTopK through their kept features (training/sparse_topk.py)
        self.d_out = d_out or d_in  # a transcoder's target width (recipe.output_hook); d_in for an SAE
        self.module = init_dictionary(recipe, d_in, dtype=self.dtype, device=self.device, d_out=self.d_out)
        frozen = {"threshold"} if recipe.architecture == "batchtopk" else set()  # set from statistics, not trained
        for name in frozen:
            getattr(self.module, name).requires_grad_(False)
        opt = recipe.optimizer
        params = [p for n, p in self.module.named_parameters() if n not in frozen]
        try:  # one fused kernel per step where torch has it for this device; the same arithmetic as Adam's loop
            self.optimizer = torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, eps=opt.eps)
        F = recipe.d_dict
        self.step_count = 0
        self.input_scale = 1.0
        self.steps_since_fired = torch.zeros(F, dtype=torch.long, device=self.device)
        self.tokens_since_fired = torch.zeros(F, dtype=torch.long, device=self.device)
        self.threshold_average: Tensor | None = None                  # batchtopk running threshold
        self.rng = torch.Generator().manual_seed(recipe.seed + 1)        # resampling draws
        window = recipe.penalty.density_window - 1 if recipe.penalty.density_coefficient > 0 else 0
        self.density_ring = torch.zeros(max(window, 0), F, device=self.device)  # previous steps' densities
        self.density_sum = torch.zeros(F, device=self.device)
        self.density_count = 0
        self._constrain_weights()

    # ---- the public step ---------------------------------------------------------------------------
    def estimate_input_scale(self, x: Tensor) -> None:
        """Set the input scale from a sample x (n, d_in) so that scaled inputs have mean L2 norm sqrt(d_in)
        (sqrt_d, Anthropic, Feb 2024) or mean squared L2 norm 1 (unit_mean_square, Rajamanoharan et al. 2024b)."""
        mode = self.recipe.input_normalization
        if mode == "none":
            return
        x = self._check(x)
        if mode == "sqrt_d":
            mean_norm = _all_reduce(x.norm(dim=-1).mean().double().reshape(1), "mean")
            self.input_scale = float(math.sqrt(self.d_in) / mean_norm.clamp_min(1e-12).item())
        else:
            mean_square = _all_reduce(x.double().pow(2).sum(-1).mean().reshape(1), "mean")
            self.input_scale = float(1.0 / mean_square.clamp_min(1e-24).sqrt().item())

    def step(self, x: Tensor, sample_inputs: Callable[[int], Tensor] | None = None, *,
             target: Tensor | None = None) -> dict[str, float]:
        """One optimisation step on raw activations x (B, d_in); returns the step's metrics. A transcoder
        predicts `target` (B, d_out), the output hook's rows of the same tokens (scaled by the same factor).

        Only the forward runs under autocast: at `self.autocast`, else at the dtype of a caller's autocast
        region; the backward, the update and the bookkeeping always run at full precision.
        """
        kind = self.device.type
        precision = self.autocast or (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)
        with torch.autocast(kind, enabled=False):
            return self._step(x, sample_inputs, precision, target)

    def _step(self, x: Tensor, sample_inputs: Callable[[int], Tensor] | None,
              precision: torch.dtype | None, target: Tensor | None = None) -> dict[str, float]:
        x = self._check(x) * self.input_scale
        y = x if target is None else self._check(target, self.d_out) * self.input_scale   # (B, d_out)
        if self.step_count == 0 and self.recipe.b_dec_init == "geometric_median":
            self._initialise_decoder_bias(y)   # b_dec lives where the decoder writes
        lr = lr_at(self.recipe, self.step_count, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # A caller's autocast region caches low-precision copies of the weights, which go stale when the
        # optimiser updates them in place: drop the cache before this forward and after the update.
        torch.clear_autocast_cache()
        self.optimizer.zero_grad(set_to_none=True)  # the last gradients (2 d F) freed before this step's (B, F)s
        with torch.autocast(self.device.type, dtype=precision or torch.bfloat16, enabled=precision is not None):
            out = compute_loss(self.module, x, self.recipe, self._context(), target=None if target is None else y,
                               sparse=self.sparse_decoding)
        out.loss.backward()
        self._all_reduce_grads()
        self._constrain_gradients()
        if self.recipe.optimizer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.recipe.optimizer.grad_clip)
        self.optimizer.step()
        self._constrain_weights()
        with torch.no_grad():
            l0, fired = _firing(out, x.shape[0], self.module.d_dict)
            fired = _all_reduce(fired.to(torch.uint8), "max").bool()
            self._count_firing(fired, x.shape[0] * max(_world(), 1))
            self._update_density(out.density)
            self._update_threshold(out.smallest_kept)
        torch.clear_autocast_cache()
        self.step_count += 1
        resampled = self._maybe_resample(x, sample_inputs)
        return self._metrics(y, out, lr, resampled, l0)

    @torch.no_grad()
    def _initialise_decoder_bias(self, x: Tensor, iterations: int = 20) -> None:
        """b_dec starts at the geometric median of the first batch (b_dec_init geometric_median: Gao et al. 2024,
        who attribute it to Bricken et al. 2023); with b_dec_init zero it keeps the 0 it was built with.

        Weiszfeld's iteration: the median is the fixed point of a mean weighted by 1 / distance.
        """
        if _world():  # the median of the global batch, so that N ranks start where one process would
            parts = [torch.empty_like(x) for _ in range(_world())]
            torch.distributed.all_gather(parts, x.contiguous())
            x = torch.cat(parts)
        median = x.mean(0)
        for _ in range(iterations):
            weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-8)              # (B,)
            median = (weights[:, None] * x).sum(0) / weights.sum()
        self.module.b_dec.copy_(median)

    def _check(self, x: Tensor, width: int | None = None) -> Tensor:
        width = width or self.d_in
        if x.ndim != 2 or x.shape[-1] != width:
            raise ShapeMismatchError("training batch", f"(batch, {width})", tuple(x.shape))
        return x.to(self.device, self.dtype)

    def _metrics(self, x: Tensor, out, lr: float, resampled: int, l0: Tensor) -> dict[str, float]:
        """The step's figures, fetched from the device in one transfer (one sync per step on a GPU)."""
        with torch.no_grad():
            raw_mse = (x - out.x_hat).pow(2).mean() / self.input_scale ** 2   # element-wise, raw units
            named = {"loss": out.loss, "mse": raw_mse, "l0": l0, "dead_frac": self.dead_mask().float().mean(),
                     "weight_norm": self.weight_norm(), **{f"loss_{k}": v for k, v in out.terms.items()}}
            values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
        return {**dict(zip(named, values)), "lr": lr, "resampled": float(resampled)}

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """The L2 norm of all parameters together, after the update, in their dtype: not finite when a weight is
        NaN or infinite, or so large (above ~1e19 in float32) that its square overflows, as the next loss would.
        The loss is taken before the update, so only this sees what the last update did."""
        # a dot product per tensor: one pass, no squared copy, and the same float32 overflow as pow(2).sum()
        return torch.stack([torch.dot(p.view(-1), p.view(-1)) for p in self.module.parameters()]).sum().sqrt()

    # ---- constraints on the decoder ----------------------------------------------------------------
    @torch.no_grad()  # recorded by autograd, each step's edit kept a (F, d) and an (F, 1) tensor alive: +16 MB a step
    def _constrain_gradients(self) -> None:
        """Unit-norm decoder: remove the gradient's component along each decoder row (Bricken et al. 2023)."""
        W, g = self.module.W_dec, self.module.W_dec.grad
        if self.recipe.decoder_norm == "unit" and g is not None:
            g.addcmul_(torch.einsum("fd,fd->f", g, W)[:, None], W, value=-1)   # g -= <g, W> W per row, no temps

    @torch.no_grad()
    def _constrain_weights(self) -> None:
        """Decoder rows back to norm 1 (unit) or down to at most 1 (Anthropic 2024); thresholds >= 0."""
        W = self.module.W_dec
        norms = W.norm(dim=-1, keepdim=True)
        if self.recipe.decoder_norm == "unit":
            W /= norms.clamp_min(1e-12)
        elif self.recipe.decoder_norm == "at_most_one":
            W /= norms.clamp_min(1.0)
        if self.recipe.architecture == "jumprelu":
            self.module.threshold.clamp_(min=0.0)

    def _all_reduce_grads(self) -> None:
        """Average gradients over ranks (data parallel), flattened into one buffer for one collective."""
        if not _world():
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = _all_reduce(torch.cat([g.flatten() for g in grads]), "mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- dead features, densities, thresholds -------------------------------------------------------
    def dead_mask(self) -> Tensor:
        """(F,) bool: dead by the recipe's rule (AuxK: tokens without firing; else steps without firing)."""
        if self.recipe.penalty.aux_k is not None:
            return self.tokens_since_fired >= self.recipe.penalty.aux_dead_tokens
        return self.steps_since_fired >= self.recipe.resampling.dead_window

    def _context(self) -> LossContext:
        warmup = self.recipe.penalty.warmup_steps  # the coefficient rises linearly from 0 (as dictionary_learning)
        scale = min(1.0, self.step_count / warmup) if warmup else 1.0
        return LossContext(self.dead_mask(), self.density_sum if self.density_ring.shape[0] else None,
                           min(self.density_count, self.density_ring.shape[0]), scale)

    def _count_firing(self, fired: Tensor, tokens: int) -> None:
        self.steps_since_fired = torch.where(fired, 0, self.steps_since_fired + 1)
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + tokens)

    def _update_density(self, density: Tensor | None) -> None:
        """Keep the last density_window - 1 batch densities (all-reduced) and their sum (Farrell 2024)."""
        window = self.density_ring.shape[0]
        if density is None or window == 0:
            return
        density = _all_reduce(density.clone(), "mean")
        slot = self.density_count % window
        if self.density_count >= window:
            self.density_sum -= self.density_ring[slot]
        self.density_ring[slot] = density
        self.density_sum += density
        self.density_count += 1

    def _update_threshold(self, smallest: Tensor | None) -> None:
        """batchtopk: running average of the smallest kept activation (Bussmann et al. 2024)."""
        if smallest is None or not torch.isfinite(smallest):
            return
        smallest = _all_reduce(smallest.detach().double().reshape(1), "mean")[0]
        if self.threshold_average is None:
            self.threshold_average = smallest
        else:
            decay = self.recipe.threshold_decay
            self.threshold_average = decay * self.threshold_average + (1 - decay) * smallest

    # ---- Anthropic resampling (Bricken et al. 2023) -------------------------------------------------
    def _maybe_resample(self, x: Tensor, sample_inputs: Callable[[int], Tensor] | None) -> int:
        rs = self.recipe.resampling
        past_until = rs.until is not None and self.step_count > rs.until
        if rs.kind != "anthropic" or self.step_count % rs.every or past_until:
            return 0
        dead = self.steps_since_fired >= rs.dead_window
        n_dead = int(dead.sum())
        if n_dead:
            inputs = x if sample_inputs is None else self._check(sample_inputs(rs.inputs)) * self.input_scale
            self.resample(dead, inputs)
        return n_dead

    def resample(self, dead: Tensor, inputs: Tensor) -> None:
        """Re-initialise the `dead` (F,) features from `inputs` (n, d), already scaled (training/resampling.py);
        the dead-feature counters of those features start again."""
        resample_features(self.module, self.optimizer, dead, inputs, self.recipe.resampling, self.rng)
        self.steps_since_fired[dead] = 0
        self.tokens_since_fired[dead] = 0

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed for a bit-identical resume (tensors copied, so later steps do not change it)."""
        return copy.deepcopy({
            "recipe": self.recipe.model_dump(mode="json", include=set(_OPTIMISATION_FIELDS)),
            "d_in": self.d_in, "total_steps": self.total_steps, "step": self.step_count,
            "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "input_scale": self.input_scale, "steps_since_fired": self.steps_since_fired,
            "tokens_since_fired": self.tokens_since_fired, "threshold_average": self.threshold_average,
            "rng": self.rng.get_state(), "density_ring": self.density_ring, "density_sum": self.density_sum,
            "density_count": self.density_count,
        })

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`; refuses one from another recipe, width or length, naming the difference,
        except the changes training/resume.py allows (the schedule from here on, clipping, a longer run)."""
        mine = self.recipe.model_dump(mode="json", include=set(_OPTIMISATION_FIELDS))
        diffs = recipe_differences(state["recipe"], mine)
        diffs += [(k, state[k], getattr(self, k)) for k in ("d_in", "total_steps") if getattr(self, k) != state[k]]
        _, refused = split_changes(diffs, step=state["step"],
                                   decay_fraction=state["recipe"]["optimizer"]["decay_fraction"])
        if refused:
            raise RecipeError([f for f, _, _ in refused], "the saved trainer state comes from a different recipe; "
                                                          "resume with the recipe that wrote it (training/resume.py "
                                                          "lists the changes a resume may make) or start afresh")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.input_scale = state["step"], state["input_scale"]
        self.steps_since_fired = state["steps_since_fired"].to(self.device)
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.threshold_average = state["threshold_average"]
        self.rng.set_state(state["rng"])
        self.density_ring = state["density_ring"].to(self.device)
        self.density_sum = state["density_sum"].to(self.device)
        self.density_count = state["density_count"]

    # ---- the result ----------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> Dictionary:
        """The trained module in native layout, taking raw activations.

        The input scale s is folded back (W_enc * s, W_dec / s, b_dec / s: features are unchanged and the
        reconstruction comes out in raw units), features with decoder norm below `prune_below` are dropped
        (Anthropic 2024), and batchtopk's inference threshold is set to the running average.
        """
        r, s = self.recipe, self.input_scale
        state = {k: v.clone() for k, v in self.module.native_state().items()}
        keep = torch.ones(r.d_dict, dtype=torch.bool, device=self.device)
        if r.prune_below is not None:
            keep = state["W_dec"].norm(dim=-1) >= r.prune_below
        state["W_enc"], state["W_dec"], state["b_dec"] = state["W_enc"] * s, state["W_dec"] / s, state["b_dec"] / s
        if r.architecture == "batchtopk" and self.threshold_average is not None:
            state["threshold"] = torch.tensor(float(self.threshold_average), dtype=self.dtype, device=self.device)
        state["W_enc"] = state["W_enc"][:, keep]
        for name in ("b_enc", "W_dec", "r_mag", "b_mag") + (("threshold",) if r.architecture == "jumprelu" else ()):
            if name in state:
                state[name] = state[name][keep]
        d_dict = int(keep.sum())
        if d_dict == 0:
            raise RecipeError(["prune_below"], f"every feature has decoder norm below {r.prune_below}, so pruning "
                                               "would leave none: train longer or lower prune_below")
        kw = {"pre_encoder_bias": r.pre_encoder_bias, "dtype": self.dtype, "device": self.device,
              "d_out": self.d_out, "skip": r.skip}   # W_skip maps scaled x to scaled y: the scale cancels
        if r.k is not None:
            kw["k"] = min(r.k, d_dict)
        return ARCHITECTURES[r.architecture](self.d_in, d_dict, **kw).load_native_state(state, "trainer").eval()
