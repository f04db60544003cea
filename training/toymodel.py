"""A tiny GPT-NeoX (Pythia's architecture and module names) and its tokenizer, built offline.

Pythia-70m and The Pile cannot be downloaded everywhere (CI, air-gapped machines), so tests, the demo
and the CPU benchmarks use this stand-in: a byte-level BPE tokenizer trained on text that ships with
Python (the language reference topics of `pydoc_data`), and a GPT-NeoX with `gpt_neox.layers.L.mlp`
etc. `pythia70m_config()` is Pythia-70m's exact config, for benchmarks whose cost must match the real model.
"""

from __future__ import annotations

from functools import lru_cache

BOS = "<|endoftext|>"
PAD = "<|padding|>"


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """About 465k characters of English prose and code from Python's own documentation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_documents() -> list[str]:
    """The corpus cut into paragraphs (documents for packing), blank ones dropped."""
    return [p.strip() for p in corpus_text().split("\n\n") if p.strip()]


@lru_cache(maxsize=4)
def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (Pythia's BOS/EOS `<|endoftext|>` = 0 and pad `<|padding|>` = 1).

    Training it is deterministic and takes about 0.1 s.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_documents(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD,
                                   unk_token=BOS, model_max_length=2048)


def tiny_config(vocab_size: int = 1024, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, **overrides):
    """A GPT-NeoX config shaped like Pythia's (parallel residual, rotary on a quarter of each head)."""
    from transformers import GPTNeoXConfig

    cfg = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
               intermediate_size=4 * d_model, max_position_embeddings=2048, rotary_pct=0.25,
               use_parallel_residual=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return GPTNeoXConfig(**cfg)


def pythia70m_config():
    """EleutherAI/pythia-70m-deduped's exact config (d_model 512, 6 layers, 8 heads, vocab 50304)."""
    return tiny_config(vocab_size=50304, d_model=512, n_layers=6, n_heads=8, intermediate_size=2048,
                       rotary_emb_base=10000, layer_norm_eps=1e-5)


def build_model(config=None, seed: int = 0):
    """A GPT-NeoX causal LM with seeded random weights, in eval mode."""
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config or tiny_config())
    return model.eval()
