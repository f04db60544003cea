"""`dictctl demo`: the whole product end to end, offline, in a few minutes on two CPU cores.

Part of the composition root with `cli.py` (the body of one command): like the CLI it reaches `training/`
only lazily, inside the steps that train.

It starts a local Hub (olah on loopback), pretrains a toy GPT-NeoX on text that ships with Python (cached
after the first run), trains a TopK dictionary on its layer-1 MLP output with a real recipe, evaluates it,
publishes it to the local Hub, loads it back by name through a registry, attaches it through nnsight and
prints the top features of a sentence with what they respond to. Every step says what it does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dictionaries.constants import CACHE_SUBDIR, CARD_FILE, ENV_REGISTRY
from dictionaries.errors import InvalidArgumentError

SENTENCE = "The for statement is used to iterate over the elements of a sequence."
REPO = "demo/toy-neox-saes"

PYTHIA_COMMANDS = """\
The same with Pythia-70m, on a machine with network (and a GPU for training):
  dictctl list --model pythia70m
  dictctl download pythia70m/mlp3/8192
  dictctl train pythia70m/mlp3/8192 --out runs            # the card's marks2023 recipe, ~800M tokens
  dictctl train 'pythia70m/mlp*/8192' --out runs          # all six layers from one pass over the model
  dictctl eval runs/pythia70m/mlp3/8192
  dictctl publish runs/pythia70m/mlp3/8192 --repo ORG/pythia70m-saes --subfolder mlp3/8192 --register
  python -c "from dictionaries import load_dictionary; print(load_dictionary('pythia70m/mlp3/8192'))\""""


@dataclass
class DemoResult:
    """What the demo made and measured."""

    name: str = ""
    folder: Path | None = None
    stats: dict = field(default_factory=dict)
    top_features: list[tuple[int, float, str]] = field(default_factory=list)
    dashboard: Path | None = None
    seconds: float = 0.0


def demo_registry(root: Path) -> Path:
    """A registry for the demo: a copy of the packaged one (the new entry is added beside the real ones)."""
    from dictionaries.registry import default_registry_path

    src = default_registry_path()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, root / "registry.yaml")
    shutil.copytree(src.parent / "cards", root / "cards", dirs_exist_ok=True)
    return root / "registry.yaml"


DEMO_BATCH = 1024
"""Activations per training step of the demo's recipe: the fewest tokens a demo can train on."""


def demo_recipe(model_folder: Path, dataset: Path, d_model: int, tokens: int):
    """TopK (Gao et al. 2024) with AuxK, scaled down: 8x expansion, k = 16, short warm-up, dead after 200k tokens."""
    from training.presets import preset, validate_recipe

    fields = preset("topk", model={"id": str(model_folder)},
                    hook={"module": "gpt_neox.layers.1.mlp", "io": "output", "site": "mlp", "layer": 1},
                    dataset={"path": str(dataset)}, context_length=64, tokens=tokens, batch_size=DEMO_BATCH,
                    buffer_contexts=256, harvest_batch_size=32, d_dict=8 * d_model, k=16,
                    **{"optimizer.lr": 2e-3, "optimizer.warmup_steps": 20, "penalty.aux_k": 64,
                       "penalty.aux_dead_tokens": 200_000}, seed=0)
    return validate_recipe(fields)


PRETRAIN_STEPS = 400
"""Steps of the toy model's pretraining in the demo (AdamW, batch 32 x 64 tokens)."""


def run_demo(workdir: str | Path | None = None, *, tokens: int = 120_000, say: Callable[[str], None] = print,
             progress: bool = True, pretrain_steps: int = PRETRAIN_STEPS) -> DemoResult:
    """Run every step; `workdir` holds the cached toy model and this run's hub, registry and outputs.
    `pretrain_steps`: the toy model's training steps, PRETRAIN_STEPS for the demo users run (~1 min on 2 cores;
    tests/test_demo.py takes fewer: the loop is the same, the model's text is learnt less)."""
    start = time.perf_counter()
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    workdir = _check_arguments(Path(workdir or hf_home / CACHE_SUBDIR / "demo"), tokens)
    run_dir = workdir / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    result = DemoResult()

    say("[1/8] Starting a local Hub (olah on 127.0.0.1) and pointing huggingface_hub at it")
    hub = _start_hub(run_dir, say)
    try:
        say("[2/8] Toy language model: a GPT-NeoX (Pythia's module names) pretrained on Python's own docs")
        model_folder, dataset, d_model = _prepare_model_and_text(workdir, run_dir, progress, pretrain_steps)
        say(f"      model: {model_folder}\n      text:  {dataset} ({dataset.stat().st_size:,} bytes)")

        say(f"[3/8] Training a TopK dictionary (8x, k=16) on gpt_neox.layers.1.mlp for {tokens:,} tokens")
        from training.run import train

        recipe = demo_recipe(model_folder, dataset, d_model, tokens)
        result.name = "toyneox/mlp1/1024"
        (folder,) = train(recipe, out=run_dir / "trained", names=[result.name], progress=progress,
                          checkpoint_every=10_000, eval_tokens=16_384)
        result.folder = folder

        say("[4/8] What the run measured on the trained dictionary, in memory before writing its folder once:")
        say("      MSE, L0, FVU, loss recovered, KL, density histogram, sensitive directions")
        from dictionaries.card import read_card

        card = read_card(folder / CARD_FILE)
        result.stats = card.stats.model_dump(exclude_none=True) if card.stats else {}
        _print_stats(result.stats, folder, say)

        dictionary = _publish_and_load(folder, hub, run_dir, result.name, say)

        say("[7/8] Attaching it through nnsight: top features of a sentence and what they respond to")
        result.top_features = _show_features(model_folder, dictionary, say, progress)

        say("[8/8] Its feature dashboard: a static page of every feature, from one pass over 8,192 tokens")
        result.dashboard = _write_dashboard(model_folder, dictionary, dataset, run_dir / "dashboard")
        say(f"      open {result.dashboard} in a browser (or `dictctl dashboard ... --serve`; "
            f"`dictctl publish ... --dashboard {result.dashboard.parent}` puts it beside the weights)")
    finally:
        hub.stop()
    result.seconds = time.perf_counter() - start
    say(f"\nDone in {result.seconds:.0f} s. Everything is under {run_dir}.\n")
    say(PYTHIA_COMMANDS)
    return result


def _check_arguments(workdir: Path, tokens: int) -> Path:
    """The work folder, after refusing what the demo cannot use; before the hub starts and the toy model trains
    (a minute of work), so bad input is said at once."""
    if tokens < DEMO_BATCH:
        raise InvalidArgumentError("tokens", tokens, f"the demo trains on at least one step of {DEMO_BATCH} tokens")
    if workdir.exists() and not workdir.is_dir():
        raise InvalidArgumentError("workdir", str(workdir), "a file is there; give a folder")
    return workdir


def _publish_and_load(folder: Path, hub, run_dir: Path, name: str, say: Callable[[str], None]):
    """Steps 5 and 6: publish the folder to the local hub, register it, load it back by its name."""
    from dictionaries.loader import load_dictionary
    from dictionaries.publish import publish

    say(f"[5/8] Publishing to the local Hub as {REPO} (one commit) and registering the entry")
    registry = demo_registry(run_dir / "registry")
    os.environ[ENV_REGISTRY] = str(registry)
    published = publish(folder, REPO, subfolder="mlp1/1024", register=True, local_hub=hub, registry_path=registry)
    say(f"      commit {published.location.revision} -> {published.registered}")
    say(f"[6/8] Loading {name!r} back by name: registry -> Hub (pinned commit, sha256 checked)")
    dictionary = load_dictionary(name)
    say(f"      {dictionary}")
    return dictionary


def _write_dashboard(model_folder: Path, dictionary, dataset: Path, out: Path) -> Path:
    """The dashboard of the demo's dictionary over the first 8,192 tokens of its corpus; its index.html."""
    from dictionaries.dashboard import build_dashboard, read_source, token_batches
    from dictionaries.dashboard_site import vocab_of, write_site
    from dictionaries.hooks import load_model

    model, tokenizer = load_model(str(model_folder))
    batches = token_batches(tokenizer, read_source(dataset), tokens=8192, context_length=64, batch_size=32)
    data = build_dashboard(model, dictionary, batches, progress=False)
    data.identity["dataset"] = dataset.name
    return write_site(data, vocab_of(tokenizer), out)


def _prepare_model_and_text(workdir: Path, run_dir: Path, progress: bool, steps: int) -> tuple[Path, Path, int]:
    """The cached pretrained toy model's folder, the corpus as a local text file, and the model width."""
    from training.toymodel import corpus_documents, toy_model_folder

    d_model = 128
    model_folder = toy_model_folder(workdir / "models", d_model=d_model, n_layers=2, steps=steps, progress=progress)
    dataset = run_dir / "corpus.txt"
    dataset.write_text("\n\n".join(corpus_documents()))
    return model_folder, dataset, d_model


def _start_hub(run_dir: Path, say: Callable[[str], None]):
    from dictionaries.localhub import LocalHub, free_port

    # huggingface_hub reads HF_ENDPOINT when it is imported, so the port is chosen and the variable set
    # before anything imports it (transformers does).
    hub = LocalHub(run_dir / "hub", port=free_port())
    os.environ["HF_ENDPOINT"] = hub.endpoint
    os.environ.pop("HF_HUB_OFFLINE", None)
    hub.start()
    say(f"      HF_ENDPOINT={hub.endpoint}")
    return hub


def _print_stats(stats: dict, folder: Path, say: Callable[[str], None]) -> None:
    keys = ("mse", "l0", "frac_alive", "variance_explained", "frac_loss_recovered", "kl", "ce_clean", "ce_spliced",
            "ce_zero")
    say("      " + ", ".join(f"{k} {stats[k]:.4g}" for k in keys if k in stats))
    if "density" in stats:
        say("      density: " + ", ".join(f"{k} {v:.4g}" for k, v in stats["density"].items()))
    if "sensitivity" in stats:
        say("      sensitivity (median step to KL 0.5): " +
            ", ".join(f"{k} {v:.3g}" for k, v in stats["sensitivity"].items() if k != "samples"))
    say(f"      plots: {folder / 'density.png'}, {folder / 'sensitivity.png'}")


def _show_features(model_folder: Path, dictionary, say: Callable[[str], None], progress: bool,
                   n_features: int = 3, max_frequency: float = 0.02) -> list[tuple[int, float, str]]:
    """The sentence's strongest *specific* features, each with its top contexts in the corpus.

    Features that fire on more than `max_frequency` of corpus tokens (punctuation, "the") are passed over:
    a researcher looking at a sentence wants the features that say something about it.
    """
    import torch

    from dictionaries.attachment import attach, wrap_model
    from dictionaries.features import features_of, inspect_feature
    from training.toymodel import corpus_documents

    model = wrap_model(str(model_folder))
    with attach(model, dictionary) as sae:
        with model.trace(SENTENCE):
            features = sae.features.save()
    f = getattr(features, "value", features)[0].detach()                        # (pos, d_dict)
    tokens = model.tokenizer.convert_ids_to_tokens(model.tokenizer(SENTENCE)["input_ids"])
    texts = corpus_documents()[:400]
    corpus = torch.cat(features_of(model, dictionary, texts, progress=False))   # (tokens, d_dict)
    frequency = (corpus > 0).float().mean(0)                                     # (d_dict,)
    peak, where = f.max(dim=0)                                                   # (d_dict,) each
    peak = torch.where(frequency <= max_frequency, peak, torch.zeros_like(peak))
    top = [i for i in peak.topk(n_features).indices.tolist() if peak[i] > 0]
    shown = []
    say(f"      sentence: {SENTENCE!r}")
    for i in top:
        token = tokens[int(where[i])].replace("Ġ", " ")
        report = inspect_feature(model, dictionary, texts, i, top=3, context=6, progress=False)
        say(f"      feature {i}: {float(peak[i]):.2f} on {token!r}; fires on {report.frequency:.2%} of corpus tokens")
        for ex in report.examples:
            say(f"         {ex.activation:6.2f}  " + ex.render("[", "]").replace("Ġ", " ").replace("\n", " "))
        if report.promoted:
            say("         promotes: " + ", ".join(repr(t.token) for t in report.promoted[:5]))
        shown.append((i, float(peak[i]), token))
    return shown
