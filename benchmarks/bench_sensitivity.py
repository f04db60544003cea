"""Apollo's sensitive-directions claim (seed 002), reproduced at the residual stream of the offline stand-in.

Seed 002 perturbs a real residual-stream activation (GPT-2 small, blocks.1.hook_resid_pre, the last of 10
tokens) toward (a) a random point with the activations' mean and covariance, (b) another real activation,
and reports that (b) reaches KL 0.5 at a smaller step than (a); its conjecture, after Lindsey (2024), is
that a dictionary feature's direction is more sensitive still. Here: the pretrained toy GPT-NeoX of the
demo (Pythia's module names), TopK dictionaries trained by this package on its residual stream after
block 0 (= blocks.1.hook_resid_pre) and after block 1, from one pass over the model; the test runs as
`training/sensitivity.py` implements it, on held-out text. Each claim is printed as holds / does not hold
with the medians; nothing is tuned to make it hold.

`python -m benchmarks sensitivity` or `python -m benchmarks.bench_sensitivity [--tokens N --samples S --out DIR]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SITES = {"resid0": 0, "resid1": 1}  # block index whose output is read (resid0 = blocks.1.hook_resid_pre)


def _recipes(model_folder: Path, corpus: Path, tokens: int) -> list:
    from training.presets import preset, validate_recipe

    return [validate_recipe(preset(
        "topk", model={"id": str(model_folder)}, dataset={"path": str(corpus)}, d_dict=1024, k=16,
        hook={"module": f"gpt_neox.layers.{layer}", "site": "resid", "layer": layer},
        context_length=64, tokens=tokens, batch_size=1024, buffer_contexts=256, harvest_batch_size=32,
        **{"optimizer.lr": 2e-3, "optimizer.warmup_steps": 20, "penalty.aux_dead_tokens": 200_000}))
        for layer in SITES.values()]


def measure(tokens: int = 120_000, samples: int = 64, out: Path | None = None, progress: bool = True,
            model_folder: Path | None = None) -> list[dict]:
    """Train the dictionaries, run the test on held-out text, return one row per site and kind plus claims."""
    from dictionaries.hooks import load_model
    from dictionaries.hub import dictionaries_cache
    from training.evaluate import evaluate
    from training.run import train
    from training.sensitivity import plot_sensitivity
    from training.toymodel import corpus_documents, toy_model_folder

    out = Path(out or tempfile.mkdtemp(prefix="bench-sensitivity-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_folder = model_folder or toy_model_folder(dictionaries_cache() / "demo" / "models", d_model=128,
                                                    n_layers=2, steps=400, progress=progress)
    corpus = out / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()))
    model, tokenizer = load_model(str(model_folder))
    recipes = _recipes(model_folder, corpus, tokens)
    folders = train(recipes, out=out / "trained", names=[f"standin/{s}/1024" for s in SITES], model=model,
                    tokenizer=tokenizer, eval_tokens=0, progress=progress, checkpoint_every=10**6)
    trained = time.perf_counter()
    from dictionaries.loader import load_dictionary

    dicts = [load_dictionary(f) for f in folders]
    r = recipes[0]
    results = evaluate(model, dicts, r.dataset, tokenizer=tokenizer, tokens=r.holdout_tokens, seed=r.seed,
                       context_length=r.context_length, sensitivity_samples=samples, progress=progress,
                       held_out="the head of the stream that training skipped")
    rows = []
    for site, result in zip(SITES, results):
        curves = result.sensitivity
        plot_sensitivity(curves, out / f"sensitivity-{site}.png", title=f"stand-in {site}: sensitive directions")
        medians = curves.medians()
        rows += [{"site": site, "kind": kind, "median step to KL 0.5": medians[kind], "samples": samples,
                  "FVU": result.stats.fvu} for kind in ("random", "real", "dictionary")]
        for kind, claim in (("real", "real-other directions are more sensitive than random ones"),
                            ("dictionary", "dictionary directions are more sensitive than random ones")):
            holds = medians[kind] < medians["random"]
            rows.append({"site": site, "kind": "claim", "claim": claim,
                         "verdict": "holds" if holds else "does not hold",
                         "figures": f"{kind} {medians[kind]:.3g} vs random {medians['random']:.3g}"})
    done = time.perf_counter()
    for row in rows:
        row.setdefault("seconds (train / test)", f"{trained - started:.0f} / {done - trained:.0f}")
    (out / "sensitivity.json").write_text(json.dumps(rows, indent=2))
    return rows


def run() -> list[dict]:
    """`python -m benchmarks sensitivity`: the default budget."""
    return measure(progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=120_000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="a save_pretrained GPT-NeoX folder (default: the "
                        "demo's pretrained toy model)")
    args = parser.parse_args()
    for row in measure(args.tokens, args.samples, args.out, model_folder=args.model):
        print(row)


if __name__ == "__main__":
    main()
