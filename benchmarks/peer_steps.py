"""The peer side of the conformance benchmark: N training steps of one peer's own trainer, from given weights.

Run in the peer's virtual environment (benchmarks/peers.py) as `python benchmarks/peer_steps.py FOLDER...`,
one interpreter for all of a peer's jobs. Each folder is one job: `job.json` (peer, trainer, its settings),
`init.safetensors` (starting weights in this package's native layout: W_enc [d, F], b_enc [F], W_dec [F, d],
b_dec [d], plus threshold / r_mag / b_mag) and `batches.safetensors` (`x`, (steps, batch, d)). The script
writes `result.safetensors` (final weights in native layout, `losses` (steps,), and the peer's own b_dec
initialisation as `own_b_dec` where it has one) and `result.json` (notes), or `error.txt`. Module level
imports torch and safetensors only; each peer is imported inside its runner, so the layout and file
functions below are testable without any peer installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# native name -> (the peer's parameter name, stored transposed). Read from each peer's module definition:
LAYOUTS: dict[str, dict[str, tuple[str, bool]]] = {
    # dictionary_learning dictionary.py AutoEncoder: nn.Linear encoder [F, d] and decoder [d, F], `bias` = b_dec
    "dl_autoencoder": {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                       "W_dec": ("decoder.weight", True), "b_dec": ("bias", False)},
    # dictionary_learning trainers/top_k.py AutoEncoderTopK and trainers/batch_top_k.py BatchTopKSAE
    "dl_topk": {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                "W_dec": ("decoder.weight", True), "b_dec": ("b_dec", False)},
    # dictionary_learning dictionary.py JumpReluAutoEncoder: plain parameters, already in native layout
    "dl_jumprelu": {n: (n, False) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
    # dictionary_learning dictionary.py GatedAutoEncoder: gate_bias is the gate's b_enc, mag_bias is b_mag
    "dl_gated": {"W_enc": ("encoder.weight", True), "b_enc": ("gate_bias", False), "W_dec": ("decoder.weight", True),
                 "b_dec": ("decoder_bias", False), "r_mag": ("r_mag", False), "b_mag": ("mag_bias", False)},
    # SAELens saes/sae.py: W_enc [d, F], W_dec [F, d] as parameters, native already
    "saelens": {n: (n, False) for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
    "saelens_jumprelu": {n: (n, False) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
    # sparsify sparse_coder.py SparseCoder: nn.Linear encoder [F, d], W_dec [F, d] as a parameter
    "sparsify": {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                 "W_dec": ("W_dec", False), "b_dec": ("b_dec", False)},
}


def to_peer(native: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Native tensors under the peer's names and layouts (only the names the layout maps)."""
    return {peer: (native[ours].T if transposed else native[ours]).contiguous()
            for ours, (peer, transposed) in LAYOUTS[layout].items() if ours in native}


def from_peer(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The peer's tensors back under native names and layouts."""
    return {ours: (state[peer].T if transposed else state[peer]).detach().contiguous()
            for ours, (peer, transposed) in LAYOUTS[layout].items() if peer in state}


def write_batches(folder: Path, batches: torch.Tensor) -> None:
    save_file({"x": batches.contiguous()}, str(folder / "batches.safetensors"))


def read_batches(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "batches.safetensors"))["x"]


def load_into(module: torch.nn.Module, native: dict[str, torch.Tensor], layout: str) -> None:
    """Copy native tensors into the peer module's own parameters (their objects kept: the optimiser holds them)."""
    with torch.no_grad():
        for name, value in to_peer(native, layout).items():
            target = module.get_parameter(name)
            target.copy_(value.to(target.dtype))


class TopDraws:
    """While active, torch.multinomial returns the n heaviest indices, heaviest first, and records the weights:
    two resamplers whose draw probabilities order the inputs alike then draw the same inputs."""

    def __enter__(self) -> TopDraws:
        self.weights: list[torch.Tensor] = []
        self.original = torch.multinomial

        def draw(weights, num_samples, *_args, **_kwargs):
            self.weights.append(weights.detach().double().cpu().clone())
            return torch.argsort(weights, descending=True, stable=True)[:num_samples].to(weights.device)

        torch.multinomial = draw
        return self

    def __exit__(self, *_exc) -> None:
        torch.multinomial = self.original


def _recording(fn, losses: list[float]):
    """`fn` that also appends the float of what it returns (a loss) to `losses`."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        losses.append(float(out))
        return out
    return wrapped


# ---- dictionary_learning 0.1.0: its trainers' own update(step, x) ----------------------------------------
def run_dictionary_learning(job: dict, init: dict, batches: torch.Tensor) -> tuple[dict, list[float], dict]:
    from dictionary_learning import trainers
    from dictionary_learning.trainers import top_k

    if job.get("exact_projection"):
        _exact_projection(trainers)

    steps, _, d_in = batches.shape
    cls = getattr(trainers, job["trainer"])
    trainer = cls(steps=steps, activation_dim=d_in, dict_size=init["W_dec"].shape[0], layer=0,
                  lm_name="conformance", device="cpu", **job.get("kwargs", {}))
    for name, value in job.get("set", {}).items():   # attributes the constructor does not take
        setattr(trainer, name, value)
    dtype = getattr(torch, job["dtype"])
    ae = trainer.ae.to(dtype)
    load_into(ae, init, job["layout"])
    notes, extra = {}, {}
    # TopKTrainer / BatchTopKTrainer set b_dec to a geometric median of the first batch in update(step=0)
    # (top_k.py geometric_median, batch_top_k.py BatchTopKTrainer.geometric_median). Keep theirs as a note;
    # with b_dec "given" they start from the b_dec in init (ours) instead, so the steps compare alone.
    original = top_k.geometric_median
    median = getattr(trainer, "geometric_median", None) or (original if cls is trainers.TopKTrainer else None)
    if median is not None:
        extra["own_b_dec"] = median(batches[0].to(dtype)).to(dtype)
        if job["b_dec"] == "given":
            given = init["b_dec"].to(dtype)
            trainer.geometric_median = lambda *_a, **_k: given.clone()
            top_k.geometric_median = trainer.geometric_median
    losses: list[float] = []
    trainer.loss = _recording(trainer.loss, losses)
    try:
        for step in range(steps):
            trainer.update(step, batches[step].to(dtype))
            if job.get("clamp_threshold"):       # JumpReluTrainer leaves thresholds free to go below 0
                with torch.no_grad():
                    ae.threshold.clamp_(min=0.0)
            if job.get("resample", {}).get("after_step") == step:
                extra["draw_weights"] = _dl_resample(trainer, job["resample"], batches[step].to(dtype))
    finally:
        top_k.geometric_median = original       # the next job in this interpreter gets the library's own
    final = from_peer(dict(ae.named_parameters()), job["layout"])
    if job["trainer"] == "BatchTopKTrainer":     # the inference threshold, a float32 buffer in batch_top_k.py
        final["threshold"] = ae.threshold.detach().to(torch.float64).reshape(())
        notes["threshold_dtype"] = str(ae.threshold.dtype)
    return {**final, **extra}, losses, notes


def _exact_projection(trainers) -> None:
    """Replace trainer.py's remove_gradient_parallel_to_decoder_directions, which divides by ||W|| + 1e-6
    and so leaves ~2e-6 of the parallel component, by the exact projection (in every module that imported it)."""
    from dictionary_learning.trainers import batch_top_k, jumprelu, top_k

    def exact(W_dec_DF, W_dec_DF_grad, activation_dim, d_sae):
        unit = W_dec_DF / W_dec_DF.norm(dim=0, keepdim=True)
        return W_dec_DF_grad - (W_dec_DF_grad * unit).sum(0, keepdim=True) * unit

    for module in (batch_top_k, jumprelu, top_k):
        module.remove_gradient_parallel_to_decoder_directions = exact


def _dl_resample(trainer, probe: dict, x: torch.Tensor) -> torch.Tensor:
    """StandardTrainer.resample_neurons on the given dead features and batch, drawing the heaviest inputs;
    with `normalise_encoder` the new encoder rows are divided by their input's norm (standard.py sets them to
    the raw input * 0.2 * mean alive norm). Returns the draw weights it used."""
    dead = torch.tensor(probe["dead"], dtype=torch.bool)
    with TopDraws() as draws:
        trainer.resample_neurons(dead.clone(), x)
    if probe.get("normalise_encoder"):
        chosen = torch.argsort(draws.weights[0], descending=True, stable=True)[:int(dead.sum())]
        with torch.no_grad():
            trainer.ae.encoder.weight[dead] /= x[chosen].norm(dim=-1, keepdim=True)
    return draws.weights[0]


# ---- SAELens 6: SAETrainer.step on a TrainingSAE of the architecture ------------------------------------
def run_saelens(job: dict, init: dict, batches: torch.Tensor) -> tuple[dict, list[float], dict]:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    steps, batch, d_in = batches.shape
    sae_cls, cfg_cls = get_sae_training_class(job["architecture"])
    sae = sae_cls(cfg_cls(d_in=d_in, d_sae=init["W_dec"].shape[0], dtype=job["dtype"], device="cpu", **job["sae"]))
    load_into(sae, init, job["layout"])
    if job.get("auxk_as_ours"):
        _saelens_auxk_as_ours(sae)
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                                              device="cpu", **job["trainer"]),
                         sae=sae, data_provider=iter(()))
    notes = {}
    if job["sae"].get("normalize_activations") == "expected_average_only_in":
        # fit() estimates the factor from the data provider (activation_scaler.py, norms summed in float32);
        # the benchmark estimates it from the first batch, keeps SAELens' figure and trains with the given one
        trainer.activation_scaler.estimate_scaling_factor(d_in, iter([batches[0]]), 1)
        notes["own_scaling_factor"] = trainer.activation_scaler.scaling_factor
        trainer.activation_scaler.scaling_factor = job["scaling_factor"]
    losses = []
    for step in range(steps):                # what fit() does per step, without logging and checkpoints
        out = trainer.step(batches[step])
        losses.append(float(out.loss))
        trainer.n_training_steps += 1
    if job.get("clamp_threshold_final"):         # JumpReLU: clamped at the start of the next training forward
        with torch.no_grad():
            sae.threshold.clamp_(min=0.0)
    final = from_peer(dict(sae.named_parameters()), job["layout"])
    if "threshold" in final:
        notes["threshold_dtype"] = str(sae.threshold.dtype)
    return final, losses, notes


def _saelens_auxk_as_ours(sae) -> None:
    """TopKTrainingSAE.calculate_topk_aux_loss with our normalisation: the same dead latents and k_aux = d_in/2,
    their top pre-activations ReLU'd, the decoder without bias, divided by ||e - mean e||^2 instead of scaled by
    min(dead / k_aux, 1) (saes/topk_sae.py: 'without variance normalization')."""
    from sae_lens.saes.topk_sae import act_times_W_dec, calculate_topk_aux_acts

    def auxk(sae_in, sae_out, hidden_pre, dead_neuron_mask):
        if dead_neuron_mask is None or not bool(dead_neuron_mask.any()):
            return sae_out.new_tensor(0.0)
        residual = (sae_in - sae_out).detach()
        k_aux = min(sae_in.shape[-1] // 2, int(dead_neuron_mask.sum()))
        acts = calculate_topk_aux_acts(k_aux, hidden_pre, dead_neuron_mask).relu()
        recons = act_times_W_dec(acts, sae.W_dec, sae.cfg.rescale_acts_by_decoder_norm)
        variance = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return sae.cfg.aux_loss_coefficient * (recons - residual).pow(2).sum() / variance

    sae.calculate_topk_aux_loss = auxk


# ---- EleutherAI sparsify 1.3: SparseCoder.forward inside trainer.py's step, with its Adam branch ---------
def run_sparsify(job: dict, init: dict, batches: torch.Tensor) -> tuple[dict, list[float], dict]:
    """Trainer.fit only runs from a language model's hooks, so its per-step order is repeated here around
    the library's own forward, loss, gradient projection and schedule (trainer.py: b_dec = batch mean at
    step 0; decoder renormalised before each forward; loss = fvu + auxk_alpha * auxk + multi_topk_fvu / 8;
    gradient parallel to decoder rows removed; Adam; HF linear warm-up and decay to 0; tokens since fired)."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    steps, batch, d_in = batches.shape
    dtype = getattr(torch, job["dtype"])
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=init["W_dec"].shape[0], **job["sae"]), dtype=dtype)
    load_into(sae, init, job["layout"])
    optimizer = torch.optim.Adam([{"params": sae.parameters(), "lr": job["lr"]}])
    schedule = get_linear_schedule_with_warmup(optimizer, job["warmup_steps"], steps)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    alpha, extra, losses = job["auxk_alpha"], {"own_b_dec": batches[0].mean(0).to(dtype)}, []
    for step in range(steps):
        x = batches[step].to(dtype)
        if step == 0 and job["b_dec"] != "given":
            sae.b_dec.data = extra["own_b_dec"].clone()
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > job["dead_feature_threshold"] if alpha > 0 else None
        out = sae(x, dead_mask=dead)
        auxk = _auxk_through_encoder(sae, x, out, dead) if job.get("auxk_through_encoder") else out.auxk_loss
        auxk = auxk * _auxk_reweighting(x, out, dead) if job.get("auxk_as_ours") else auxk
        loss = out.fvu + alpha * auxk + out.multi_topk_fvu / 8
        loss.backward()
        losses.append(float(loss))
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        fired = torch.zeros(sae.num_latents, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        since_fired += batch
        since_fired[fired] = 0
    if job.get("renormalise_final"):             # what the next step (or the saved coder's user) would see
        sae.set_decoder_norm_to_unit_norm()
    return {**from_peer(dict(sae.named_parameters()), job["layout"]), **extra}, losses, {}


def _auxk_through_encoder(sae, x: torch.Tensor, out, dead: torch.Tensor | None) -> torch.Tensor:
    """sparse_coder.py's AuxK term, the same formula on the same latents, but from pre-activations that autograd
    can differentiate: FusedEncoder's backward (fused_encoder.py) drops the gradient of the pre-activations it
    returns, so sparsify's own term never reaches the encoder or b_dec."""
    from sparsify.utils import decoder_impl

    if dead is None or not bool(dead.any()):
        return out.auxk_loss
    pre = torch.relu(torch.nn.functional.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    k_aux = min(x.shape[-1] // 2, int(dead.sum()))
    values, indices = torch.where(dead[None], pre, -torch.inf).topk(k_aux, sorted=False)
    e_hat = decoder_impl(indices, values, sae.W_dec.mT)
    scale = min(int(dead.sum()) / (x.shape[-1] // 2), 1.0)
    e = (x - out.sae_out).detach()
    return scale * (e_hat - e).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _auxk_reweighting(x: torch.Tensor, out, dead: torch.Tensor | None) -> torch.Tensor:
    """The factor that turns sparsify's AuxK, min(dead / k_aux, 1) * S / sum ||x - mean x||^2, into ours,
    S / sum ||e - mean e||^2 (S = ||e_hat - e||^2 summed), both constants of this step."""
    if dead is None or not bool(dead.any()):
        return x.new_tensor(1.0)
    scale = min(int(dead.sum()) / (x.shape[-1] // 2), 1.0)
    e = (x - out.sae_out).detach()
    return (x - x.mean(0)).pow(2).sum() / (scale * (e - e.mean(0)).pow(2).sum())


RUNNERS = {"dictionary_learning": run_dictionary_learning, "saelens": run_saelens, "sparsify": run_sparsify}


def run_job(folder: Path) -> None:
    """One job folder: its result files, or `error.txt` with the exception's last line."""
    job = json.loads((folder / "job.json").read_text())
    torch.manual_seed(0)                         # peers that draw at construction draw the same each run
    init = load_file(str(folder / "init.safetensors"))
    tensors, losses, notes = RUNNERS[job["peer"]](job, init, read_batches(folder))
    tensors = {k: v.detach().to(torch.float64).contiguous() for k, v in tensors.items()}
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    save_file(tensors, str(folder / "result.safetensors"))
    (folder / "result.json").write_text(json.dumps({"notes": notes}))


def main(folders: list[Path]) -> None:
    """Every job in one interpreter (the peer is imported once); a failing job does not stop the others."""
    for folder in folders:
        try:
            run_job(folder)
        except Exception as exc:  # reported per job, as the row's reason
            (folder / "error.txt").write_text(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
