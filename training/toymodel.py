"""A tiny GPT-NeoX (Pythia's architecture and module names) and its tokenizer, built offline.

Pythia-70m and The Pile cannot be downloaded everywhere (CI, air-gapped machines), so tests, the demo
and the CPU benchmarks use this stand-in: a byte-level BPE tokenizer trained on text that ships with
Python (the language reference topics of `pydoc_data`), and a GPT-NeoX with `gpt_neox.layers.L.mlp`
etc. `pythia70m_config()` is Pythia-70m's exact config, for benchmarks whose cost must match the real model.

A larger stand-in for experiments whose figures must mean something (benchmarks/bench_recipes.py: loss
recovered needs a model whose MLPs matter): `standin_model_folder()` pretrains a 4-layer GPT-NeoX once on the
same docs plus the docstrings of Python's standard library (about 0.7M tokens), keeping every 20th document
out of pretraining as held-out text, and caches it under the HF cache.
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


def pack_corpus(tokenizer, context_length: int, documents: list[str] | None = None):
    """The whole corpus (or `documents`) tokenised, documents joined by EOS, cut into (n_contexts, context_length)
    ids."""
    import torch

    ids: list[int] = []
    for doc in corpus_documents() if documents is None else documents:
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // context_length
    return torch.tensor(ids[: n * context_length]).view(n, context_length)


def pretrain(model, tokenizer, *, steps: int = 600, batch_size: int = 32, context_length: int = 64,
             lr: float = 3e-3, seed: int = 0, progress: bool = True, documents: list[str] | None = None):
    """Train the toy LM briefly on the corpus (AdamW, cosine decay), so that its activations carry structure.

    A randomly initialised model's activations are nearly isotropic noise: dictionaries trained on them
    find nothing. A few hundred steps give a model whose next-token loss is far below uniform.
    `documents` replaces the corpus (the stand-in's pretraining split).
    """
    import math

    import torch
    from tqdm.auto import tqdm

    data = pack_corpus(tokenizer, context_length, documents)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    bar = tqdm(range(steps), desc="pretraining toy LM", disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = data[torch.randint(len(data), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def toy_model_folder(cache_dir, *, d_model: int = 128, n_layers: int = 4, steps: int = 600,
                     progress: bool = True):
    """A folder holding the pretrained toy GPT-NeoX and its tokenizer (`from_pretrained`-loadable).

    Built once and cached under `cache_dir` (keyed by its settings); later calls return at once.
    """
    from pathlib import Path

    folder = Path(cache_dir) / f"toy-neox-d{d_model}-l{n_layers}-s{steps}"
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    tokenizer = build_tokenizer()
    model = build_model(tiny_config(d_model=d_model, n_layers=n_layers))
    pretrain(model, tokenizer, steps=steps, progress=progress)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)  # atomic: a half-written folder is never taken for a finished one
    return folder


# ---- the larger stand-in (benchmarks/bench_recipes.py) -----------------------------------------------------
HELD_OUT_EVERY = 20
"""Every 20th stand-in document is held out of pretraining (and so of any dictionary's training activations)."""


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of at least `min_chars` characters from the standard library's
    sources (its tests and site-packages left out), in a fixed order: about 1.3M characters on Python 3.11.

    Read with `ast`, nothing imported. Parsing takes some seconds, so the stand-in caches the result.
    """
    import ast
    import sysconfig
    from pathlib import Path

    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    texts = []
    for path in sorted(lib.rglob("*.py")):
        if skip & set(path.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
    return texts


def standin_documents() -> tuple[list[str], list[str]]:
    """(pretraining documents, held-out documents): the toy corpus's paragraphs then the stdlib docstrings,
    every HELD_OUT_EVERY-th one held out (about 0.68M and 0.036M tokens with the toy tokenizer)."""
    docs = corpus_documents() + stdlib_docstrings()
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def standin_config():
    """The stand-in's shape: Pythia's architecture (parallel residual, partial rotary) at d_model 128, 4 layers,
    4 heads, MLP 512, vocab 1024: about 1M parameters, small enough to pretrain on two CPU cores in minutes."""
    return tiny_config(d_model=128, n_layers=4, n_heads=4)


def standin_model_folder(cache_dir=None, *, steps: int = 1600, batch_size: int = 16, context_length: int = 64,
                         lr: float = 3e-3, progress: bool = True):
    """A folder with the pretrained stand-in (`from_pretrained`-loadable), its tokenizer, `documents.json`
    ({"train": [...], "held_out": [...]}) and `pretraining.json` (tokens, seconds, final loss).

    Pretrained once and cached under `cache_dir` (default `<HF_HOME>/dictionaries/standin`), keyed by its
    settings and the Python version (whose standard library is the text); later calls return at once.
    """
    import json
    import sys
    import time
    from pathlib import Path

    if cache_dir is None:
        from dictionaries.hub import dictionaries_cache

        cache_dir = dictionaries_cache() / "standin"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = Path(cache_dir) / f"neox-d128-l4-s{steps}-b{batch_size}-c{context_length}-py{py}"
    if (folder / "pretraining.json").exists():
        return folder
    start = time.perf_counter()
    train_docs, held_out = standin_documents()
    tokenizer = build_tokenizer()
    model = build_model(standin_config())
    pretrain(model, tokenizer, steps=steps, batch_size=batch_size, context_length=context_length, lr=lr,
             progress=progress, documents=train_docs)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "documents.json").write_text(json.dumps({"train": train_docs, "held_out": held_out}))
    record = {"tokens": steps * batch_size * context_length, "seconds": round(time.perf_counter() - start, 1),
              "steps": steps, "batch_size": batch_size, "context_length": context_length, "lr": lr}
    (tmp / "pretraining.json").write_text(json.dumps(record, indent=1))
    if folder.exists():  # a previous run stopped between writing and renaming
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)  # atomic: a half-written folder is never taken for a finished one
    return folder
