"""Helpers shared by the tests: tiny models of three families, seeded dictionaries, native folders.

Fixtures live in conftest.py; these are plain functions and constants, imported as `from helpers import ...`
(pytest puts tests/ on the path).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from dictionaries.architectures import build_dictionary
from dictionaries.card import Card, Files, Stats
from dictionaries.recipe import HookPoint, ModelRef

TEXTS = ["The Eiffel Tower is in", "Python objects are", "a"]
D_IN, D_DICT = 8, 16
"""Sizes of the small dictionaries of the format, publish and loader tests."""


# ---- models ------------------------------------------------------------------------------------------
def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=1024, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def llama_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


# (family, block path prefix, d_model)
FAMILIES = {"neox": ("gpt_neox.layers", 64), "gpt2": ("transformer.h", 32), "llama": ("model.layers", 32)}
ATTN = {"neox": "attention", "gpt2": "attn", "llama": "self_attn"}
EMBED = {"neox": "gpt_neox.embed_in", "gpt2": "transformer.wte", "llama": "model.embed_tokens"}


def batch(tokenizer, texts=TEXTS):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def make_dictionary(d_in: int, d_dict: int, hook: str | None, kind: str = "relu", seed: int = 0,
                    model_id: str | None = None):
    """A dictionary of `kind` with seeded random weights (thresholds low enough that features fire)."""
    hp = None if hook is None else HookPoint(module=hook.split(":")[0], io=(hook.split(":") + ["output"])[1],
                                             site="mlp", layer=0)
    card = Card(name=f"test/mlp0/{d_dict}", architecture=kind, d_in=d_in, d_dict=d_dict,
                k=4 if kind in ("topk", "batchtopk") else None, files=Files(items=[]), hook=hp,
                model=ModelRef(id=model_id) if model_id else None)
    d = build_dictionary(card)
    return seed_weights(d, seed)


def seed_weights(d, seed: int = 0):
    """d with seeded random weights (thresholds low enough that features fire); returns d."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.05))
        if d.architecture in ("jumprelu", "batchtopk"):
            d.threshold.fill_(0.01)
    return d


def make_card(arch: str = "relu", name: str = "toy/mlp0/16") -> Card:
    return Card(name=name, architecture=arch, d_in=D_IN, d_dict=D_DICT, k=4 if arch in ("topk", "batchtopk") else None,
                license="MIT", authors=["Test Author"], model=ModelRef(id="toy-org/tiny-neox"),
                hook=HookPoint(module="gpt_neox.layers.0.mlp", site="mlp", layer=0),
                files=Files(items=[]),
                stats=Stats(source="measured", dataset="python docs", tokens=1000, l0=3.5, mse=0.0123,
                            frac_loss_recovered=0.9))


def make_folder(folder: Path, arch: str = "relu", seed: int = 0, name: str = "toy/mlp0/16"):
    """A native folder written by formats.write_native with seeded random weights; (card, module)."""
    from dictionaries.formats import write_native

    torch.manual_seed(seed)
    d = build_dictionary(make_card(arch, name))
    d.load_native_state({k: torch.randn_like(v) * 0.3 for k, v in d.native_state().items()})
    card = write_native(d, folder, card=make_card(arch, name))
    return card, d


def snapshot(registry: Path) -> dict[str, bytes]:
    root = registry.parent
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- runs: weights on disk, a kill between checkpoints, dictctl in this process -----------------------
def weights(folder: Path) -> dict:
    """The tensors of a native folder's weights.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "weights.safetensors"))


class Killed(BaseException):
    """Stands for the process being killed between two checkpoints."""


def kill_at(monkeypatch, step: int) -> None:
    """Make the `step`-th call of Trainer.step (counting from 1, over all trainers) raise Killed."""
    from training.trainer import Trainer

    calls = {"n": 0}
    real = Trainer.step

    def step_or_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", step_or_die)


def dictctl(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `dictctl ARGS` in this process through cli.main (exit code, stdout, stderr)."""
    import sys

    from dictionaries import cli

    monkeypatch.setattr(sys, "argv", ["dictctl", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err



HEAVY_IMPORTS_PROBE = """
import sys
sys.argv = ["dictctl", *sys.argv[1:]]
from dictionaries.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "training", "nnsight", "transformers"})
print("HEAVY:" + ",".join(heavy))
"""
"""Run as `python -c PROBE ARGS...` from the repository root: runs `dictctl ARGS` in-process and prints, last,
`HEAVY:` and which of torch, training, nnsight and transformers the command imported."""


def dense_and_sparse(module, x, recipe, dead) -> tuple[list, list[dict]]:
    """compute_loss(sparse=False) then (sparse=True) on the same module and batch, each backward from zeroed
    gradients: ([dense, sparse] LossOutputs, [their gradients by parameter name])."""
    from training import losses

    outs, grads = [], []
    for sparse in (False, True):
        module.zero_grad(set_to_none=True)
        out = losses.compute_loss(module, x, recipe, losses.LossContext(dead), sparse=sparse)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    return outs, grads


# ---- a real browser ------------------------------------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
"""Flags for headless Debian chromium on a machine without a network (its background fetches would fail)."""


@contextmanager
def chromium_page(errors: list[str]):
    """A page of headless chromium driven by playwright; console errors and page errors are appended to `errors`.

    Skips (with the reason) only where the browser or playwright cannot be installed; `.ci/run` installs both.
    """
    import shutil

    import pytest

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH (CI installs Debian's `chromium`; apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the `test` extra)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page
        finally:
            browser.close()


# ---- transcoders ---------------------------------------------------------------------------------------
def make_transcoder(d_in: int, d_out: int, d_dict: int, hook: str, output_hook: str, kind: str = "relu",
                    skip: bool = False, seed: int = 0, layer: int = 0):
    """A (skip-)transcoder of `kind` reading `hook` and predicting `output_hook` ("path[:io]"), seeded weights."""
    def point(ref: str) -> HookPoint:
        path, _, io = ref.partition(":")
        return HookPoint(module=path, io=io or "output", site="mlp", layer=layer)

    card = Card(name=f"test/mlp{layer}/{d_dict}-transcoder", architecture=kind, d_in=d_in, d_dict=d_dict,
                k=4 if kind in ("topk", "batchtopk") else None, files=Files(items=[]), hook=point(hook),
                output_hook=point(output_hook), d_out=d_out if d_out != d_in else None, skip=skip)
    d = build_dictionary(card)
    return seed_weights(d, seed)


# ---- logits with edits, by plain torch hooks and through a trace -------------------------------------
def reference_logits(raw, ids, mask, edits: dict[str, callable]):
    """Logits with each module's output x replaced by edits[path](x), via plain torch hooks."""
    from dictionaries.hooks import _position_ids

    handles = []
    for path, fn in edits.items():
        def hook(m, a, o, fn=fn):
            return (fn(o[0]), *o[1:]) if isinstance(o, tuple) else fn(o)
        handles.append(raw.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        out = raw(ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
    for h in handles:
        h.remove()
    return out


def keep_pads(mask, fn):
    """Apply fn at real positions only, as an Attachment does."""
    return lambda x: torch.where(mask.bool()[..., None], fn(x), x)


def traced_logits(model, ids, mask, body):
    with torch.no_grad(), model.trace(ids, attention_mask=mask):
        body()
        logits = model.output.logits.save()
    return logits


# ---- training runs on the tiny GPT-NeoX (test_run.py, test_session.py) ----------------------------------
MLP0 = {"module": "gpt_neox.layers.0.mlp", "site": "mlp", "layer": 0}


def run_recipe(corpus, hook=MLP0, name="bricken2023", **fields):
    """A small recipe of preset `name` on the corpus file: 24 steps of 128 tokens, 96 features."""
    from dictionaries.recipe import Recipe
    from training.presets import preset

    base = dict(model={"id": "toy-neox"}, hook=hook, dataset={"path": str(corpus)}, context_length=32,
                tokens=128 * 24, batch_size=128, buffer_contexts=16, harvest_batch_size=8, d_dict=96,
                holdout_tokens=512, optimizer={"lr": 1e-3, "warmup_steps": 4},
                resampling={"kind": "anthropic", "every": 6, "dead_window": 3, "inputs": 256})
    base.update(fields)
    return Recipe.model_validate(preset(name, **base))


def train(recipes, out, tiny_neox, tokenizer, **kw):
    """training.run.train on the tiny model, checkpoints every 5 steps, no bar, no evaluation unless asked."""
    from training import run as run_module

    kw = {"checkpoint_every": 5, "progress": False, **kw}
    kw.setdefault("eval_tokens", 0)
    return run_module.train(recipes, out=out, model=tiny_neox, tokenizer=tokenizer, **kw)
