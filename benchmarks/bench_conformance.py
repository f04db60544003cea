"""Conformance against the original implementations, side by side: our Trainer and the peer's own trainer
start from the same weights, see the same batches, and their weights and losses are compared after STEPS steps.

One row per (preset, peer[, variant]). Each comparison below names the preset, the overrides on our side, the
peer's trainer and settings, the transforms that make the two comparable (`aligned`, each citing the peer's
source file) and the differences kept on purpose in that row (`known`). The verdict is `equal` (every tensor
and every step's loss within TOLERANCE of ours, float64 on both sides), `equal after <aligned>`, or
`differs (...)`: <known>. Peers run in their own venvs (benchmarks/peers.py) through benchmarks/peer_steps.py.
Shape: STEPS steps of BATCH activations, D_IN -> D_DICT, float64, synthetic data (conformance.make_batches).

`python -m benchmarks conformance`, or `python -m benchmarks.bench_conformance [NAME_SUBSTRING]`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

STEPS, BATCH, D_IN, D_DICT, K, LR, DEAD = 40, 256, 48, 192, 8, 1e-3, 16
# Every preset is run at this lr and without warm-up (the presets' 1000 warm-up steps outlast the run);
# a comparison's own overrides come on top.
COMMON = {"optimizer.lr": LR, "optimizer.warmup_steps": 0}

# Shared statements, each citing the peer source it comes from.
NO_WARMUP_DL = ("lr warm-up off on both (DL ramps from 0 at step 0, trainer.py get_lr_schedule step/warmup; "
                "ours (step+1)/warmup)")
GIVEN_B_DEC = "peer b_dec starts at our geometric median of batch 0"
MSE_SUM = "MSE summed over d_in (mse=sum_dims; the preset averages over elements)"
CLIP = "grad_clip 1.0 (the preset clips nothing)"


@dataclass(frozen=True)
class Comparison:
    preset: str
    peer: str
    trainer: str                       # the peer's trainer, as the row names it
    ours: dict                         # overrides of the preset (dotted keys), beyond the run's shape
    job: dict                          # what benchmarks/peer_steps.py needs besides weights and batches
    aligned: tuple[str, ...]           # transforms making the sides comparable
    known: tuple[str, ...] = ()        # differences kept on purpose in this row
    variant: str = ""
    dead: int = 0                      # features started dead (conformance.make_init)
    dead_by: str = "bias"
    scaled_inputs: bool = False        # the peer trains on our input_scale * x (its trainer does not normalise)
    float32: tuple[str, ...] = ()      # tensors the peer keeps in float32 whatever the dtype
    extra: dict = field(default_factory=dict)


def _dl(trainer: str, layout: str, **kwargs) -> dict:
    settings = kwargs.pop("set", {})
    return {"peer": "dictionary_learning", "trainer": trainer, "layout": layout, "dtype": "float64",
            "b_dec": "given", "kwargs": {"lr": LR, "warmup_steps": 0, **kwargs}, "set": settings}


def _saelens(architecture: str, layout: str, sae: dict, **trainer) -> dict:
    return {"peer": "saelens", "architecture": architecture, "layout": layout, "dtype": "float64", "b_dec": "given",
            "sae": sae, "trainer": {"lr": LR, "lr_end": LR, "dead_feature_window": 10**9, **trainer}}


def _sparsify(**job) -> dict:
    return {"peer": "sparsify", "layout": "sparsify", "dtype": "float64", "b_dec": "given", "sae": {"k": K},
            "lr": LR, "warmup_steps": 0, "auxk_alpha": 0.0, "dead_feature_threshold": 10**7,
            "renormalise_final": True, **job}


def dictionary_learning_comparisons() -> list[Comparison]:
    """dictionary_learning 0.1.0 trainers (dictionary_learning/trainers/*.py)."""
    dl_sparsity = "DL's sparsity warm-up off (sparsity_warmup_steps=None; default 2000)"
    topk_aux = ("aux_k = d_in/2 (top_k.py top_k_aux = activation_dim // 2; the preset says 512)",
                "DL's dead threshold = ours + one batch (DL adds the current batch before testing, top_k.py loss)",
                CLIP + " (top_k.py update clips at 1.0)")
    topk_set = {"dead_feature_threshold": 4 * BATCH}
    resample = ("DL resamples after step 10j+1 and re-warms lr from 0 after each (standard.py update, "
                "trainer.py get_lr_schedule resample branch); ours after step 10j, no re-warm",
                "DL: dead = no firing for > R/2 steps; draws inputs with p ~ ||x - x_hat|| (ours ~ squared); "
                "new encoder rows = raw input * 0.2 * mean alive norm (ours: the normalised input)")
    return [
        Comparison("marks2023", "dictionary_learning", "StandardTrainer",
                   {"mse": "sum_dims", "resampling.kind": "none"},
                   _dl("StandardTrainer", "dl_autoencoder", l1_penalty=1e-3, sparsity_warmup_steps=None),
                   (MSE_SUM + " (standard.py recon_loss)", dl_sparsity, NO_WARMUP_DL,
                    GIVEN_B_DEC + " (DL's AutoEncoder starts at 0, dictionary.py)", "resampling off")),
        Comparison("marks2023", "dictionary_learning", "StandardTrainer",
                   {"mse": "sum_dims", "resampling.every": 10, "resampling.dead_window": 5,
                    "resampling.inputs": BATCH},
                   _dl("StandardTrainer", "dl_autoencoder", l1_penalty=1e-3, sparsity_warmup_steps=None,
                       resample_steps=10, warmup_steps=1),
                   (MSE_SUM, dl_sparsity, GIVEN_B_DEC), resample, variant="resampling every 10", dead=DEAD),
        Comparison("topk", "dictionary_learning", "TopKTrainer",
                   {"k": K, "mse": "sum_dims", "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH,
                    "optimizer.grad_clip": 1.0},
                   _dl("TopKTrainer", "dl_topk", k=K, auxk_alpha=1 / 32, threshold_start_step=10**9, set=topk_set),
                   (MSE_SUM + " (top_k.py l2_loss)", *topk_aux, NO_WARMUP_DL,
                    GIVEN_B_DEC + " (DL: geometric_median, <= 100 steps to tol 1e-5)"),
                   dead=DEAD, dead_by="small"),
        Comparison("batchtopk", "dictionary_learning", "BatchTopKTrainer",
                   {"k": K, "mse": "sum_dims", "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH,
                    "optimizer.grad_clip": 1.0},
                   _dl("BatchTopKTrainer", "dl_topk", k=K, auxk_alpha=1 / 32, threshold_start_step=-1,
                       set=topk_set),
                   (MSE_SUM + " (batch_top_k.py l2_loss)", *topk_aux, NO_WARMUP_DL, GIVEN_B_DEC,
                    "DL's threshold average from step 0 (threshold_start_step=-1; default 1000)"),
                   dead=DEAD, dead_by="small", float32=("threshold",)),
        Comparison("jumprelu", "dictionary_learning", "JumpReluTrainer", {"optimizer.grad_clip": 1.0},
                   _dl("JumpReluTrainer", "dl_jumprelu", bandwidth=1e-3, sparsity_penalty=1e-3,
                       sparsity_warmup_steps=None, target_l0=20.0),
                   (CLIP + " (jumprelu.py update)", NO_WARMUP_DL, GIVEN_B_DEC + " (DL starts at 0)",
                    "DL fed our sqrt(d)-normalised inputs (DL's trainSAE scales to mean ||x||^2 = 1, training.py)"),
                   ("DL's penalty is c * (L0/target_l0 - 1)^2, not c * L0, and its step STE reads f, not the "
                    "pre-activation (jumprelu.py loss)",), scaled_inputs=True),
        Comparison("jumprelu", "dictionary_learning", "JumpReluTrainer",
                   {"optimizer.grad_clip": 1.0, "penalty.coefficient": 0.0},
                   _dl("JumpReluTrainer", "dl_jumprelu", bandwidth=1e-3, sparsity_penalty=0.0,
                       sparsity_warmup_steps=None, target_l0=20.0),
                   (CLIP, NO_WARMUP_DL, GIVEN_B_DEC, "DL fed our sqrt(d)-normalised inputs",
                    "sparsity terms off on both"), variant="no sparsity term", scaled_inputs=True),
        Comparison("gated", "dictionary_learning", "GatedSAETrainer", {"mse": "sum_dims"},
                   _dl("GatedSAETrainer", "dl_gated", l1_penalty=1e-3, sparsity_warmup_steps=None),
                   (MSE_SUM + " (gdm.py L_recon and L_aux)", dl_sparsity, NO_WARMUP_DL,
                    GIVEN_B_DEC + " (DL starts at 0, dictionary.py)")),
    ]


def saelens_comparisons() -> list[Comparison]:
    """SAELens 6 TrainingSAEs driven by its SAETrainer.step (sae_lens/training/sae_trainer.py)."""
    clip = CLIP + " (sae_trainer.py _train_step clips at 1.0)"
    scaling = "SAELens trains with our input scale (the same sqrt(d)/mean ||x||, summed in float32 there)"
    given = GIVEN_B_DEC + " (SAELens starts at 0, sae.py initialize_weights)"
    no_pre_bias = "SAELens apply_b_dec_to_input=False (its default True; the preset has no pre-encoder bias)"
    norm_in = {"normalize_activations": "expected_average_only_in"}
    topk_sae = {"k": K, "rescale_acts_by_decoder_norm": False, "aux_loss_coefficient": 1 / 32}
    topk_free = ("decoder free on both (decoder_norm=free; SAELens rescale_acts_by_decoder_norm=False, whose "
                 "default True divides by the decoder norms inside the forward, topk_sae.py act_times_W_dec)")
    return [
        Comparison("anthropic2024", "saelens", "StandardTrainingSAE",
                   {"decoder_norm": "free", "prune_below": None, "penalty.scale_by_decoder_norm": True,
                    "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 5},
                   _saelens("standard", "saelens", {"l1_coefficient": 5.0, "apply_b_dec_to_input": False, **norm_in},
                            adam_beta1=0.0, lr_warm_up_steps=5, lr_decay_steps=round(0.2 * STEPS)),
                   ("decoder free, L1 weighted by ||W_dec|| (standard_sae.py calculate_aux_loss; the preset keeps "
                    "||W_dec|| <= 1 with a plain L1, Anthropic Feb 2024)", clip, no_pre_bias, given, scaling)),
        Comparison("topk", "saelens", "TopKTrainingSAE",
                   {"k": K, "decoder_norm": "free", "mse": "sum_dims", "penalty.aux_k": None,
                    "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 5},
                   _saelens("topk", "saelens", topk_sae, lr_warm_up_steps=5),
                   (topk_free, MSE_SUM + " (sae.py training_forward_pass)", clip, given,
                    "AuxK off on both (nothing dead within SAELens' dead_feature_window)")),
        Comparison("topk", "saelens", "TopKTrainingSAE",
                   {"k": K, "decoder_norm": "free", "mse": "sum_dims", "penalty.aux_k": D_IN // 2,
                    "penalty.aux_dead_tokens": 3 * BATCH, "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 5},
                   _saelens("topk", "saelens", topk_sae, lr_warm_up_steps=5, dead_feature_window=2),
                   (topk_free, MSE_SUM, clip, given, "dead after 3 silent steps on both"),
                   ("SAELens' AuxK is coefficient * min(dead/k_aux, 1) * mean ||e_hat - e||^2 on unReLU'd "
                    "pre-activations (topk_sae.py calculate_topk_aux_loss); ours divides by ||e - mean e||^2",),
                   variant="AuxK", dead=DEAD, dead_by="small"),
        Comparison("jumprelu", "saelens", "JumpReLUTrainingSAE",
                   {"decoder_norm": "free", "optimizer.grad_clip": 1.0, "optimizer.warmup_steps": 5},
                   _saelens("jumprelu", "saelens_jumprelu",
                            {"jumprelu_init_threshold": 1e-3, "jumprelu_bandwidth": 1e-3, "l0_coefficient": 1e-3,
                             "jumprelu_sparsity_loss_mode": "step", "apply_b_dec_to_input": False, **norm_in},
                            adam_beta1=0.0, lr_warm_up_steps=5),
                   ("decoder free (SAELens' JumpReLU has no decoder-norm constraint; the preset keeps unit rows)",
                    clip, no_pre_bias, given, scaling), float32=("threshold",)),
    ]


def sparsify_comparisons() -> list[Comparison]:
    """EleutherAI sparsify 1.3 SparseCoder with trainer.py's step (Adam branch)."""
    common = ("sparsify's Adam branch (optimizer='adam'; its default, signum, has no counterpart in our recipes)",
              "lr decays linearly to 0 over the run (decay_fraction=1.0; trainer.py get_linear_schedule_with_warmup)",
              "FVU = element-mean MSE on equal-variance batches (sparse_coder.py forward)",
              GIVEN_B_DEC + " (sparsify: the batch mean, trainer.py)",
              "peer's final decoder renormalised (sparsify renormalises before each forward, not after the step)")
    return [
        Comparison("topk", "sparsify", "SparseCoder", {"k": K, "penalty.aux_k": None, "optimizer.decay_fraction": 1.0},
                   _sparsify(), (*common, "AuxK off on both (auxk_alpha defaults to 0, config.py)")),
        Comparison("topk", "sparsify", "SparseCoder",
                   {"k": K, "penalty.aux_k": D_IN // 2, "penalty.aux_dead_tokens": 3 * BATCH,
                    "optimizer.decay_fraction": 1.0},
                   _sparsify(auxk_alpha=1 / 32, dead_feature_threshold=3 * BATCH - 1),
                   (*common, "dead after 3 silent steps on both"),
                   ("sparsify's AuxK divides by the variance of x, not of the residual, and scales by "
                    "min(dead/k_aux, 1) (sparse_coder.py forward)",), variant="AuxK", dead=DEAD, dead_by="small"),
    ]


def comparisons() -> list[Comparison]:
    return dictionary_learning_comparisons() + saelens_comparisons() + sparsify_comparisons()


def run(only: str = "") -> list[dict]:
    """Every comparison's row (those whose preset/peer/variant contains `only`)."""
    from benchmarks.conformance import rows_for

    chosen = [c for c in comparisons() if only in f"{c.preset} {c.peer} {c.variant}"]
    return rows_for(chosen, steps=STEPS, batch=BATCH, d_in=D_IN, d_dict=D_DICT, common=COMMON)


if __name__ == "__main__":
    for row in run(" ".join(sys.argv[1:])):
        print(row)
