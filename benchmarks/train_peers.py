"""The peers' runs of `benchmarks train`, each in its own virtual environment (benchmarks/peers.py).

dictionary_learning (ActivationBuffer + trainSAE, StandardTrainer: the marks2023 recipe) and SAELens
(LanguageModelSAETrainingRunner, standard L1 SAE) train the L1 dictionary at mlp3; sparsify (Trainer.fit,
TopK k=32, AuxK 1/32, Adam) the TopK one. Same model config, text, context, batch, steps, learning rate and
warm-up as ours, and the same buffer: two batches of rows, half refilled by forwards of one batch of contexts
(dictionary_learning's refresh_batch_size and SAELens' store_batch_size_prompts set so; each drops what does
not fit, so larger forwards would waste work). Step boundaries are stamped from outside each loop
(train_runs.phases).
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.train_runs import CONTEXT, D_MODEL, N_LAYERS, corpus_documents, cpu_seconds, peak_mb, phases


def _documents_forever():
    while True:
        yield from corpus_documents()


def _fp32_only(peer: str, precision: str) -> None:
    if precision != "fp32":
        raise ValueError(f"{peer} has no {precision} training on this device (see bench_train.PLANS)")


def dictionary_learning_child(steps: int, batch: int, d_dict: int, warmup: int, device: str, folder: Path,
                              precision: str = "fp32") -> dict:
    """dictionary_learning's ActivationBuffer and StandardTrainer at mlp3, stepped as its trainSAE steps them.

    trainSAE itself cannot be imported here: dictionary_learning/training.py imports wandb at module level,
    which the venv leaves out (benchmarks/peers.py installs only what the trainers import). Its loop on CPU,
    without logging or intermediate saves, is: build the trainer from the config, `trainer.update(step, act)`
    for each buffer batch, save `ae.pt`; that is what runs here.
    """
    import torch
    _fp32_only("dictionary_learning", precision)
    from dictionary_learning import ActivationBuffer
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.standard import StandardTrainer
    from nnsight import LanguageModel

    from training.toymodel import build_model, build_tokenizer, pythia70m_config

    model = LanguageModel(build_model(pythia70m_config()).to(device), tokenizer=build_tokenizer())
    stamps: list[float] = []
    called, cpu = time.time(), cpu_seconds()
    buffer = ActivationBuffer(_documents_forever(), model, model.gpt_neox.layers[3].mlp, d_submodule=D_MODEL,
                              n_ctxs=2 * batch // CONTEXT, ctx_len=CONTEXT, refresh_batch_size=batch // CONTEXT,
                              out_batch_size=batch, device=device)
    trainer = StandardTrainer(dict_class=AutoEncoder, activation_dim=D_MODEL, dict_size=d_dict, lr=1e-3,
                              l1_penalty=1e-3, warmup_steps=warmup, sparsity_warmup_steps=None, layer=3,
                              lm_name="pythia70m-random", steps=steps, device=device)
    for step in range(steps):
        stamps.append(time.time())  # step i's batch requested (its harvest, when due, inside the interval)
        trainer.update(step, next(buffer))
    (folder / "out").mkdir()
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, folder / "out" / "ae.pt")
    returned, cpu = time.time(), cpu_seconds() - cpu
    return {**phases(called, stamps, returned, warmup, batch, steps * batch), "cpu_s": cpu, "peak_mb": peak_mb()}


def saelens_child(steps: int, batch: int, d_dict: int, warmup: int, device: str, folder: Path,
                  precision: str = "fp32") -> dict:
    """SAELens' LanguageModelSAETrainingRunner (standard L1 SAE) on a random transformer_lens Pythia-70m; bf16 is
    its own mixed precision: `autocast` (the SAE's forward) and `autocast_lm` (the model's, in the store)."""
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from training.toymodel import build_tokenizer

    cfg = HookedTransformerConfig(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=8, d_head=64, d_mlp=4 * D_MODEL,
                                  d_vocab=50304, n_ctx=2048, act_fn="gelu", normalization_type="LN",
                                  positional_embedding_type="rotary", rotary_dim=16, parallel_attn_mlp=True,
                                  original_architecture="GPTNeoXForCausalLM", device=device, seed=0)
    build_tokenizer().save_pretrained(folder / "tokenizer")  # transformer_lens reloads it by name_or_path
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"))
    # SAELens' mixing buffer holds n_batches_in_buffer * context_size rows: two batches of rows, as ours
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=d_dict, l1_coefficient=1e-3),
        model_name="pythia70m-random", hook_name="blocks.3.hook_mlp_out", dataset_path="", streaming=False,
        is_dataset_tokenized=False, context_size=CONTEXT, training_tokens=steps * batch,
        train_batch_size_tokens=batch, n_batches_in_buffer=2 * batch // CONTEXT,
        store_batch_size_prompts=batch // CONTEXT,
        device=device, lr=1e-3, lr_warm_up_steps=warmup, autocast=precision == "bf16",
        autocast_lm=precision == "bf16", logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(folder / "ckpt"), n_checkpoints=0, output_path=str(folder / "out"))
    stamps: list[float] = []
    real_step = SAETrainer.step

    def step(self, *args, **kwargs):  # called with the batch already drawn: stamps[i] is step i's start
        stamps.append(time.time())
        return real_step(self, *args, **kwargs)

    SAETrainer.step = step
    called, cpu = time.time(), cpu_seconds()
    LanguageModelSAETrainingRunner(runner_cfg, override_dataset=Dataset.from_dict({"text": corpus_documents()}),
                                   override_model=model).run()
    returned, cpu = time.time(), cpu_seconds() - cpu
    return {**phases(called, stamps, returned, warmup, batch, steps * batch), "cpu_s": cpu, "peak_mb": peak_mb()}


def _token_contexts(tokenizer, contexts: int) -> list[list[int]]:
    """The corpus tokenised, documents joined by EOS and cut into CONTEXT-token contexts, repeated as needed."""
    ids: list[int] = []
    for text in corpus_documents():
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids * (1 + contexts * CONTEXT // len(ids))
    return [ids[i * CONTEXT:(i + 1) * CONTEXT] for i in range(contexts)]


def sparsify_child(steps: int, batch: int, d_dict: int, warmup: int, device: str, folder: Path,
                   precision: str = "fp32") -> dict:
    """EleutherAI sparsify's Trainer.fit: TopK k=32 at mlp3, Adam, AuxK 1/32, FVU loss."""
    if device == "cpu":  # its bf16 autocast is gated on torch.cuda.is_bf16_supported()
        _fp32_only("sparsify on the CPU", precision)
    from datasets import Dataset
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    from training.toymodel import build_model, build_tokenizer, pythia70m_config

    model = build_model(pythia70m_config()).to(device)
    data = Dataset.from_dict({"input_ids": _token_contexts(build_tokenizer(), steps * batch // CONTEXT)})
    data = data.with_format("torch")
    cfg = TrainConfig(SparseCoderConfig(num_latents=d_dict, k=32), batch_size=batch // CONTEXT, loss_fn="fvu",
                      optimizer="adam", lr=2e-4, lr_warmup_steps=warmup, auxk_alpha=1 / 32,
                      hookpoints=["layers.3.mlp"], log_to_wandb=False, save_every=10**9,
                      save_dir=str(folder / "out"))
    stamps: list[float] = []
    model.register_forward_pre_hook(lambda *_: stamps.append(time.time()))  # one forward a step
    called, cpu = time.time(), cpu_seconds()
    trainer = Trainer(cfg, data, model)     # runs a forward of its own to read the hook widths
    fitting = time.time()
    trainer.fit()
    returned, cpu = time.time(), cpu_seconds() - cpu
    stamps = [t for t in stamps if t >= fitting]
    return {**phases(called, stamps, returned, warmup, batch, steps * batch), "cpu_s": cpu, "peak_mb": peak_mb()}


PEER_CHILDREN = {"dictionary_learning": dictionary_learning_child, "saelens": saelens_child,
                 "sparsify": sparsify_child}
