"""Conformance against the original implementations, side by side: our Trainer and the peer's own trainer
start from the same weights, see the same batches, and their weights and losses are compared after STEPS steps.

One row per (preset, peer[, variant]). Each comparison below names the preset, the overrides on our side, the
peer's trainer and settings, the transforms that make the two comparable (`aligned`) and the differences kept
on purpose in that row (`known`), both as short phrases that GLOSSARY explains with the peer source file that
shows each. The verdict is `equal` (every tensor and every step's loss within conformance.TOLERANCE, float64
on both sides), `equal after: <aligned>`, or `differs (<tensors>): <known>`. Peers run in their own venvs
(benchmarks/peers.py) through benchmarks/peer_steps.py. Shape: STEPS steps of BATCH activations, D_IN -> D_DICT,
float64, synthetic data (conformance.make_batches).

`python -m benchmarks conformance`; `python -m benchmarks.bench_conformance [NAME_SUBSTRING]` for some rows;
`python -m benchmarks.bench_conformance --explain` prints the glossary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

STEPS, BATCH, D_IN, D_DICT, K, LR, DEAD = 40, 256, 48, 192, 8, 1e-3, 16
# Every preset is run at this lr and without warm-up (the presets' 1000 warm-up steps outlast the run);
# a comparison's own overrides come on top.
COMMON = {"optimizer.lr": LR, "optimizer.warmup_steps": 0}

# Every phrase a verdict uses, explained with the source that shows it (DL = dictionary_learning 0.1.0,
# dictionary_learning/...; SAELens 6.54 sae_lens/...; sparsify = eai-sparsify 1.3.3 sparsify/...).
GLOSSARY = {
    # ---- alignments: our option switched to the peer's behaviour, or the peer given ours ----
    "mse=sum_dims": "our MSE summed over d_in, averaged over tokens, as the peer's (DL trainers/standard.py "
                    "recon_loss, top_k.py and batch_top_k.py l2_loss, gdm.py L_recon and L_aux; SAELens "
                    "saes/sae.py training_forward_pass); marks2023 averages over all elements as DL's 2023 "
                    "training.py (nn.MSELoss) did, topk/batchtopk normalise by the batch variance (Gao et al.)",
    "no sparsity warm-up": "DL sparsity_warmup_steps=None: its default 2000 ramps the penalty up from 0 "
                           "(trainers/trainer.py get_sparsity_warmup_fn); our recipes have no such warm-up",
    "DL 0.1.0's resampler (marks2023 keeps 2023's mean-alive rows)": "our resampling.encoder_init input and "
        "reset_decoder_moments on, as DL 0.1.0 resamples (trainers/standard.py resample_neurons); marks2023 itself "
        "follows DL's training.py of Nov 2023, which trained its entries: 0.2 x the mean alive encoder row",
    "no L0 warm-up": "our penalty.warmup_steps 0: the jumprelu preset warms the L0 coefficient up over 10,000 "
                     "steps (Gemma Scope); SAELens' l0_warm_up_steps is 0 here",
    "no lr warm-up": "lr warm-up off on both: DL's get_lr_schedule (trainers/trainer.py) gives step/warmup, so "
                     "lr 0 at step 0 while Adam's moments still move; ours (step+1)/warmup",
    "our b_dec init": "the peer starts from our b_dec (geometric median of batch 0, 20 Weiszfeld steps): DL's "
                      "AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder and SAELens start at 0 (dictionary.py; "
                      "saes/sae.py initialize_weights); DL's TopK/BatchTopK take a geometric median to tol 1e-5 "
                      "(trainers/top_k.py geometric_median; notes: its distance to ours); sparsify the batch "
                      "mean (trainer.py)",
    "no resampling": "resampling off on both (the rows 'resampling ...' compare it)",
    "aux_k=d_in/2": "our penalty.aux_k = d_in // 2, DL's fixed top_k_aux (trainers/top_k.py, Gao et al. B.1); "
                    "the topk/batchtopk presets say 512",
    "DL dead threshold + 1 batch": "DL adds the current batch to tokens-since-fired before it tests deadness "
                                   "(top_k.py and batch_top_k.py loss), ours tests the previous batches: DL's "
                                   "dead_feature_threshold = ours + one batch",
    "grad_clip=1": "our optimizer.grad_clip = 1.0, as DL's TopK/BatchTopK/JumpReLU update() and SAELens' "
                   "_train_step (training/sae_trainer.py) clip; the presets clip nothing",
    "exact projection": "DL's remove_gradient_parallel_to_decoder_directions (trainers/trainer.py) divides by "
                        "||W_dec|| + 1e-6, leaving ~2e-6 of the parallel gradient; replaced by the exact "
                        "projection (without it: ~4e-7 after 40 steps)",
    "DL threshold from step 0": "BatchTopK threshold_start_step=-1: batch_top_k.py starts the running "
                                "threshold only after step 1000 by default; ours from step 0",
    "inputs x our scale": "the peer trains on our input_scale * x (sqrt(d_in) / mean ||x|| of batch 0): DL's "
                          "trainers do not normalise (its trainSAE scales to mean ||x||^2 = 1, training.py "
                          "get_norm_factor); SAELens' expected_average_only_in is our formula with norms summed "
                          "in float32 (training/activation_scaler.py; notes: its own)",
    "DL thresholds clamped at 0": "DL's JumpReLU thresholds clamped at 0 after each step as ours are: "
                                  "trainers/jumprelu.py lets them go below 0, where they pass negative "
                                  "pre-activations (77 of 192 did here)",
    "no sparsity term": "both sparsity coefficients 0 (ours penalty.coefficient, DL sparsity_penalty)",
    "DL resample at our step": "DL's StandardTrainer.resample_neurons called on the features ours replaced, "
                               "after the same step, on the same batch (no lr re-warm)",
    "heaviest draws": "both resamplers draw the heaviest inputs instead of sampling: DL weighs ||x - x_hat|| "
                      "(standard.py resample_neurons), ours the square (Bricken 2023); same order (notes: the "
                      "weights agree, squared)",
    "DL new encoder rows / ||x||": "DL's new encoder rows divided by their input's norm: standard.py sets "
                                   "them to the raw input * 0.2 * mean alive norm, ours to the unit input * "
                                   "0.2 * mean alive norm",
    "decoder free, L1 x ||W_dec||": "our decoder_norm=free and penalty.scale_by_decoder_norm: SAELens' "
                                    "standard SAE leaves the decoder free and weights the L1 by the decoder "
                                    "norms (saes/standard_sae.py; Anthropic, April 2024); the anthropic2024 "
                                    "preset keeps ||W_dec|| <= 1 with a plain L1 (Feb 2024)",
    "no pre-encoder bias in SAELens": "SAELens apply_b_dec_to_input=False (default True, saes/sae.py); the "
                                      "preset has no pre-encoder bias",
    "decoder free": "our decoder_norm=free: SAELens constrains no decoder norm (topk with "
                    "rescale_acts_by_decoder_norm=False; its default True divides by the norms inside the "
                    "forward, saes/topk_sae.py act_times_W_dec, which our recipe cannot express); the presets "
                    "keep unit rows",
    "no AuxK": "AuxK off on both (nothing dead within the peer's window, or auxk_alpha = 0: sparsify's "
               "default, config.py)",
    "dead after 3 silent steps": "dead = did not fire in the last 3 batches on both sides",
    "final thresholds clamped": "the peer's final thresholds clamped at 0: SAELens clamps them before each "
                                "training forward (saes/jumprelu_sae.py), ours after each step",
    "sparsify Adam": "sparsify's optimizer='adam' branch (trainer.py); its default, signum, has no counterpart "
                     "in our recipes",
    "lr to 0 over the run": "our decay_fraction=1.0: sparsify's Adam decays lr linearly to 0 over all steps "
                            "(trainer.py get_linear_schedule_with_warmup)",
    "FVU = MSE": "sparsify's loss is sum ||e||^2 / sum ||x - mean x||^2 (sparse_coder.py forward); on batches "
                 "of equal total variance B * d_in it is our element-mean MSE",
    "final decoder renormalised": "the peer's final decoder renormalised: sparsify renormalises before each "
                                  "forward (trainer.py), ours after each step",
    "SAELens AuxK as ours": "SAELens' calculate_topk_aux_loss replaced by the same computation normalised as "
                            "ours: ReLU on the dead latents' top pre-activations, divided by ||e - mean e||^2, "
                            "no min(dead / k_aux, 1) (saes/topk_sae.py)",
    "sparsify AuxK reweighted as ours": "sparsify's AuxK term multiplied, each step, by sum ||x - mean x||^2 / "
                                        "(min(dead / k_aux, 1) * sum ||e - mean e||^2), which makes it ours",
    "sparsify AuxK through the encoder": "sparsify's AuxK recomputed by the same formula on the same latents "
                                         "from pre-activations autograd differentiates, so that its gradient "
                                         "reaches the encoder and b_dec as ours does",
    # ---- differences kept in a row ----
    "DL resampling schedule": "DL resamples after steps 10j+1 (0-based step % R == 0) and re-warms lr from 0 "
                              "after each (standard.py update; trainer.py get_lr_schedule resample branch), "
                              "counts dead after > R/2 silent steps, draws with p ~ ||x - x_hat|| and gives new "
                              "encoder rows the raw input's norm; ours resamples after steps 10j, no re-warm, "
                              "p ~ squared, unit input (row 'one resampling, same draws' isolates these)",
    "DL target-L0 penalty": "DL's JumpReLU penalty is c * (L0 / target_l0 - 1)^2 with the step STE read on "
                            "f rather than the pre-activation (trainers/jumprelu.py loss), not c * L0 "
                            "(Rajamanoharan et al. 2024b); row 'no sparsity term' shows the rest agrees",
    "SAELens AuxK": "SAELens' AuxK is aux_coefficient * min(dead / k_aux, 1) * mean ||e_hat - e||^2 on "
                    "pre-activations without ReLU (saes/topk_sae.py calculate_topk_aux_loss); ours divides by "
                    "||e - mean e||^2 (Gao et al. 2024)",
    "sparsify AuxK": "sparsify's AuxK is min(dead / k_aux, 1) * ||e_hat - e||^2 / sum ||x - mean x||^2 "
                     "(sparse_coder.py forward); ours divides by ||e - mean e||^2",
    "sparsify AuxK stops at the encoder": "sparsify's AuxK reads the pre-activations that FusedEncoder returns, "
                                          "whose gradient its backward drops (fused_encoder.py backward uses "
                                          "grad_values only): AuxK trains the dead latents' decoder rows but not "
                                          "their encoder, nor b_dec through it; ours trains both (Gao et al. 2024)",
    # ---- precision notes ----
    "DL AuxK in float32": "DL computes AuxK in float32 (top_k.py/batch_top_k.py get_auxiliary_loss .float()): "
                          "weights held to float32 tolerance (with nothing dead they agree to 1e-15)",
    "threshold float32": "the peer keeps the threshold in float32 (batch_top_k.py update_threshold; "
                         "saes/jumprelu_sae.py): held to float32 tolerance",
}


@dataclass(frozen=True)
class Comparison:
    preset: str
    peer: str
    trainer: str                       # the peer's trainer, as the row names it
    ours: dict                         # overrides of the preset (dotted keys), beyond the run's shape
    job: dict                          # what benchmarks/peer_steps.py needs besides weights and batches
    aligned: tuple[str, ...]           # transforms making the sides comparable (GLOSSARY keys)
    known: tuple[str, ...] = ()        # differences kept on purpose in this row (GLOSSARY keys)
    variant: str = ""
    dead: int = 0                      # features started dead (conformance.make_init)
    dead_by: str = "bias"
    scaled_inputs: bool = False        # the peer trains on our input_scale * x (its trainer does not normalise)
    float32: tuple[str, ...] = ()      # tensors held to float32 tolerance (FLOAT32_TOLERANCE) ...
    precision: str = ""                # ... and why (GLOSSARY keys joined by "; "), shown in the notes


def _dl(trainer: str, layout: str, **kwargs) -> dict:
    settings = kwargs.pop("set", {})
    return {"peer": "dictionary_learning", "trainer": trainer, "layout": layout, "dtype": "float64",
            "b_dec": "given", "kwargs": {"lr": LR, "warmup_steps": 0, **kwargs}, "set": settings,
            "exact_projection": trainer in ("TopKTrainer", "BatchTopKTrainer", "JumpReluTrainer")}


def _saelens(architecture: str, layout: str, sae: dict, **trainer) -> dict:
    return {"peer": "saelens", "architecture": architecture, "layout": layout, "dtype": "float64", "b_dec": "given",
            "sae": sae, "trainer": {"lr": LR, "lr_end": LR, "dead_feature_window": 10**9, **trainer}}


def _sparsify(**job) -> dict:
    return {"peer": "sparsify", "layout": "sparsify", "dtype": "float64", "b_dec": "given", "sae": {"k": K},
            "lr": LR, "warmup_steps": 0, "auxk_alpha": 0.0, "dead_feature_threshold": 10**7,
            "renormalise_final": True, **job}


def dictionary_learning_comparisons() -> list[Comparison]:
    """dictionary_learning 0.1.0 trainers (dictionary_learning/trainers/*.py)."""
    base = ("no lr warm-up", "our b_dec init")
    topk = {"k": K, "mse": "sum_dims", "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH,
            "optimizer.grad_clip": 1.0}
    topk_aligned = ("mse=sum_dims", "aux_k=d_in/2", "DL dead threshold + 1 batch", "grad_clip=1", "exact projection",
                    *base)
    topk_set = {"dead_feature_threshold": 4 * BATCH}
    weights = ("W_enc", "b_enc", "W_dec", "b_dec")
    standard = {"l1_penalty": 1e-3, "sparsity_warmup_steps": None}
    jump = {"bandwidth": 1e-3, "sparsity_warmup_steps": None, "target_l0": 20.0}
    jump_aligned = ("grad_clip=1", "inputs x our scale", "DL thresholds clamped at 0", "exact projection", *base)
    return [
        Comparison("marks2023", "dictionary_learning", "StandardTrainer",
                   {"mse": "sum_dims", "resampling.kind": "none"}, _dl("StandardTrainer", "dl_autoencoder", **standard),
                   ("mse=sum_dims", "no sparsity warm-up", "no resampling", *base)),
        Comparison("marks2023", "dictionary_learning", "StandardTrainer",
                   {"mse": "sum_dims", "resampling.every": 10, "resampling.dead_window": 5,
                    "resampling.inputs": BATCH},
                   _dl("StandardTrainer", "dl_autoencoder", resample_steps=10, warmup_steps=1, **standard),
                   ("mse=sum_dims", "no sparsity warm-up", "our b_dec init"), ("DL resampling schedule",),
                   variant="resampling every 10", dead=DEAD),
        Comparison("marks2023", "dictionary_learning", "StandardTrainer",
                   {"mse": "sum_dims", "resampling.every": 5, "resampling.until": 5, "resampling.dead_window": 5,
                    "resampling.inputs": BATCH, "resampling.encoder_init": "input",
                    "resampling.reset_decoder_moments": True},
                   _dl("StandardTrainer", "dl_autoencoder", **standard) | {"resample": {"normalise_encoder": True}},
                   ("mse=sum_dims", "no sparsity warm-up", *base, "DL resample at our step", "heaviest draws",
                    "DL new encoder rows / ||x||", "DL 0.1.0's resampler (marks2023 keeps 2023's mean-alive rows)"),
                   variant="one resampling, same draws", dead=DEAD),
        Comparison("topk", "dictionary_learning", "TopKTrainer", topk,
                   _dl("TopKTrainer", "dl_topk", k=K, auxk_alpha=1 / 32, threshold_start_step=10**9, set=topk_set),
                   topk_aligned, dead=DEAD, dead_by="small", float32=weights, precision="DL AuxK in float32"),
        Comparison("batchtopk", "dictionary_learning", "BatchTopKTrainer", topk,
                   _dl("BatchTopKTrainer", "dl_topk", k=K, auxk_alpha=1 / 32, threshold_start_step=-1, set=topk_set),
                   (*topk_aligned, "DL threshold from step 0"), dead=DEAD, dead_by="small",
                   float32=(*weights, "threshold"), precision="DL AuxK in float32; threshold float32"),
        Comparison("jumprelu", "dictionary_learning", "JumpReluTrainer", {"optimizer.grad_clip": 1.0},
                   _dl("JumpReluTrainer", "dl_jumprelu", sparsity_penalty=1e-3, **jump) | {"clamp_threshold": True},
                   jump_aligned, ("DL target-L0 penalty",), scaled_inputs=True),
        Comparison("jumprelu", "dictionary_learning", "JumpReluTrainer",
                   {"optimizer.grad_clip": 1.0, "penalty.coefficient": 0.0},
                   _dl("JumpReluTrainer", "dl_jumprelu", sparsity_penalty=0.0, **jump) | {"clamp_threshold": True},
                   (*jump_aligned, "no sparsity term"), variant="no sparsity term", scaled_inputs=True),
        Comparison("gated", "dictionary_learning", "GatedSAETrainer", {"mse": "sum_dims"},
                   _dl("GatedSAETrainer", "dl_gated", **standard), ("mse=sum_dims", "no sparsity warm-up", *base)),
    ]


def saelens_comparisons() -> list[Comparison]:
    """SAELens 6 TrainingSAEs driven by its SAETrainer.step (sae_lens/training/sae_trainer.py)."""
    norm_in = {"normalize_activations": "expected_average_only_in"}
    topk_sae = {"k": K, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 1 / 32}
    topk = {"k": K, "decoder_norm": "free", "mse": "sum_dims", "optimizer.grad_clip": 1.0,
            "optimizer.warmup_steps": 5}
    jump_sae = {"jumprelu_init_threshold": 1e-3, "jumprelu_bandwidth": 1e-3, "l0_coefficient": 1e-3,
                "jumprelu_sparsity_loss_mode": "step", "apply_b_dec_to_input": False, **norm_in}
    return [
        Comparison("anthropic2024", "saelens", "StandardTrainingSAE",
                   {"decoder_norm": "free", "prune_below": None, "penalty.scale_by_decoder_norm": True,
                    "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 5},
                   _saelens("standard", "saelens", {"l1_coefficient": 5.0, "apply_b_dec_to_input": False, **norm_in},
                            adam_beta1=0.0, lr_warm_up_steps=5, lr_decay_steps=round(0.2 * STEPS)),
                   ("decoder free, L1 x ||W_dec||", "grad_clip=1", "no pre-encoder bias in SAELens",
                    "our b_dec init", "inputs x our scale")),
        Comparison("topk", "saelens", "TopKTrainingSAE", {**topk, "penalty.aux_k": None},
                   _saelens("topk", "saelens", topk_sae, lr_warm_up_steps=5),
                   ("decoder free", "mse=sum_dims", "grad_clip=1", "no AuxK", "our b_dec init")),
        Comparison("topk", "saelens", "TopKTrainingSAE",
                   {**topk, "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH},
                   _saelens("topk", "saelens", topk_sae, lr_warm_up_steps=5, dead_feature_window=2),
                   ("decoder free", "mse=sum_dims", "grad_clip=1", "dead after 3 silent steps", "our b_dec init"),
                   ("SAELens AuxK",), variant="AuxK", dead=DEAD, dead_by="small"),
        Comparison("topk", "saelens", "TopKTrainingSAE",
                   {**topk, "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH},
                   _saelens("topk", "saelens", topk_sae, lr_warm_up_steps=5, dead_feature_window=2)
                   | {"auxk_as_ours": True},
                   ("decoder free", "mse=sum_dims", "grad_clip=1", "dead after 3 silent steps", "our b_dec init",
                    "SAELens AuxK as ours"), variant="AuxK normalised as ours", dead=DEAD, dead_by="small"),
        Comparison("jumprelu", "saelens", "JumpReLUTrainingSAE",
                   {"decoder_norm": "free", "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 5,
                    "penalty.warmup_steps": 0},
                   _saelens("jumprelu", "saelens_jumprelu", jump_sae, adam_beta1=0.0, lr_warm_up_steps=5)
                   | {"clamp_threshold_final": True},
                   ("decoder free", "grad_clip=1", "no pre-encoder bias in SAELens", "final thresholds clamped",
                    "our b_dec init", "inputs x our scale", "no L0 warm-up"), float32=("threshold",),
                   precision="threshold float32"),
    ]


def sparsify_comparisons() -> list[Comparison]:
    """EleutherAI sparsify 1.3 SparseCoder with trainer.py's step (Adam branch)."""
    aligned = ("sparsify Adam", "lr to 0 over the run", "FVU = MSE", "final decoder renormalised", "our b_dec init")
    topk = {"k": K, "optimizer.decay_fraction": 1.0}
    return [
        Comparison("topk", "sparsify", "SparseCoder", {**topk, "penalty.aux_k": None}, _sparsify(),
                   (*aligned, "no AuxK")),
        Comparison("topk", "sparsify", "SparseCoder",
                   {**topk, "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH},
                   _sparsify(auxk_alpha=1 / 32, dead_feature_threshold=3 * BATCH - 1),
                   (*aligned, "dead after 3 silent steps"), ("sparsify AuxK",), variant="AuxK", dead=DEAD,
                   dead_by="small"),
        Comparison("topk", "sparsify", "SparseCoder",
                   {**topk, "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH},
                   _sparsify(auxk_alpha=1 / 32, dead_feature_threshold=3 * BATCH - 1, auxk_as_ours=True),
                   (*aligned, "dead after 3 silent steps", "sparsify AuxK reweighted as ours"),
                   ("sparsify AuxK stops at the encoder",), variant="AuxK normalised as ours", dead=DEAD,
                   dead_by="small"),
        Comparison("topk", "sparsify", "SparseCoder",
                   {**topk, "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH},
                   _sparsify(auxk_alpha=1 / 32, dead_feature_threshold=3 * BATCH - 1, auxk_as_ours=True,
                             auxk_through_encoder=True),
                   (*aligned, "dead after 3 silent steps", "sparsify AuxK reweighted as ours",
                    "sparsify AuxK through the encoder"), variant="AuxK as ours, through the encoder", dead=DEAD,
                   dead_by="small"),
    ]


def comparisons() -> list[Comparison]:
    return dictionary_learning_comparisons() + saelens_comparisons() + sparsify_comparisons()


def run(only: str = "") -> list[dict]:
    """Every comparison's row (those whose preset/peer/variant contains `only`)."""
    from benchmarks.conformance import rows_for

    chosen = [c for c in comparisons() if only in f"{c.preset} {c.peer} {c.variant}"]
    return rows_for(chosen, steps=STEPS, batch=BATCH, d_in=D_IN, d_dict=D_DICT, common=COMMON)


if __name__ == "__main__":
    if sys.argv[1:] == ["--explain"]:
        for phrase, meaning in GLOSSARY.items():
            print(f"{phrase}: {meaning}")
    else:
        for row in run(" ".join(sys.argv[1:])):
            print(row)
