"""Writers against the peers' own loaders: dictionaries built here, written with `convert --to X` and published with
`publish --layout saelens` to a local hub, loaded by the real SAELens, sparsify and dictionary_learning.

For every architecture (relu with and without pre-encoder bias, topk, jumprelu, gated, batchtopk) a seeded
dictionary (unit decoder rows, the encoder tied to them, thresholds at a quantile of its pre-activations so that
some features fire and some do not) is written natively, converted to each library's layout the library can hold
(foreign_writers.py) and published in SAELens' layout to a `dictionaries.localhub` server. The peer, in its own
venv (benchmarks/peers.py), loads each folder with its documented loader (benchmarks/peer_loads.py: SAELens'
`SAE.load_from_disk` and `SAE.from_pretrained(repo, subfolder)` with HF_ENDPOINT at the local hub, sparsify's
`SparseCoder.load_from_disk`, dictionary_learning's `utils.load_dictionary`) and returns its features and
reconstructions of the same N inputs; each row gives the largest absolute difference from this package's module
(float32) and `equal` when both are within 1e-5 relative to max(1, |value|).

`python -m benchmarks writers`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

D_IN, D_DICT, K, N = 32, 128, 8, 256
KINDS = {"standard": ("relu", True), "standard, no pre-encoder bias": ("relu", False), "topk": ("topk", True),
         "jumprelu": ("jumprelu", True), "gated": ("gated", True), "batchtopk": ("batchtopk", True)}
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                "batchtopk": "jumprelu (BatchTopK's inference form)"}
TRAINED = "topk, trained here"
TOLERANCE = 1e-5
LOADER = {"saelens": "SAE.load_from_disk", "sparsify": "SparseCoder.load_from_disk",
          "dictionary_learning": "utils.load_dictionary's dispatch"}
ROOT = Path(__file__).resolve().parent.parent


def build(kind: str, pre_encoder_bias: bool, seed: int):
    """A seeded dictionary of `kind` with a card naming a model and hook point (GPT-NeoX, block 1's output)."""
    from dictionaries.architectures import build_dictionary
    from dictionaries.card import Card, Files
    from dictionaries.recipe import HookPoint, ModelRef

    card = Card(name=f"bench/resid1/{D_DICT}-{kind}", architecture=kind, d_in=D_IN, d_dict=D_DICT,
                k=K if kind in ("topk", "batchtopk") else None, pre_encoder_bias=pre_encoder_bias,
                model=ModelRef(id="EleutherAI/pythia-70m-deduped"), files=Files(items=[]),
                hook=HookPoint(module="gpt_neox.layers.1", site="resid", layer=1))
    d = build_dictionary(card)
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_DICT, D_IN, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    state = {"W_enc": W_dec.T.clone(), "b_enc": torch.randn(D_DICT, generator=g) * 0.1, "W_dec": W_dec,
             "b_dec": torch.randn(D_IN, generator=g) * 0.1}
    if kind == "gated":
        state.update(r_mag=torch.randn(D_DICT, generator=g) * 0.1, b_mag=torch.randn(D_DICT, generator=g) * 0.1)
    if kind in ("jumprelu", "batchtopk"):
        state["threshold"] = torch.zeros(D_DICT) if kind == "jumprelu" else torch.tensor(0.0)
    d.load_native_state(state)
    if kind in ("jumprelu", "batchtopk"):  # thresholds at the 90th percentile of positive pre-activations
        pre = d.pre_activation(inputs()).relu()
        with torch.no_grad():
            d.threshold.copy_(pre.quantile(0.9, dim=0) if kind == "jumprelu" else pre[pre > 0].quantile(0.9))
    return d


def train_one(tmp: Path):
    """A TopK dictionary trained here by `training.run.train` (the path `dictctl train` takes) at block 1's output
    of a tiny random GPT-NeoX with d_model = D_IN, on the toy corpus: a few hundred steps' worth of real
    weights rather than seeded ones, evaluated on held-out text as a run always is."""
    from dictionaries.loader import load_dictionary
    from dictionaries.recipe import Recipe
    from training.presets import preset
    from training.run import train
    from training.toymodel import build_model, build_tokenizer, corpus_documents, tiny_config

    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_documents()))
    recipe = Recipe.model_validate(preset(
        "topk", model={"id": "toy/gpt-neox-d32"}, dataset={"path": str(corpus)},
        hook={"module": "gpt_neox.layers.1", "site": "resid", "layer": 1}, context_length=32, tokens=256 * 48,
        batch_size=256, buffer_contexts=64, harvest_batch_size=16, d_dict=D_DICT, k=K, holdout_tokens=1024))
    model = build_model(tiny_config(d_model=D_IN, n_heads=4), seed=0).eval()
    [out] = train(recipe, out=tmp / "trained", device="cpu", model=model, tokenizer=build_tokenizer(),
                  names=[f"bench/resid1/{D_DICT}-trained"], progress=False)
    return load_dictionary(str(out))


def inputs() -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(0)) + 0.5


def write_all(tmp: Path, hub) -> tuple[dict, dict[str, list[dict]]]:
    """Write every dictionary natively, in each peer's layout and to the local hub; (our outputs, peer jobs)."""
    from safetensors.torch import save_file

    from dictionaries.formats import convert, write_native
    from dictionaries.publish import publish

    ours, jobs = {}, {"saelens": [], "sparsify": [], "dictionary_learning": []}
    for i, (name, (kind, pre)) in enumerate([*KINDS.items(), (TRAINED, ("topk", True))]):
        slug = name.replace(", ", "-").replace(" ", "-")
        d = train_one(tmp) if name == TRAINED else build(kind, pre, seed=i)
        with torch.no_grad():
            ours[name] = d(inputs())
        native = tmp / "native" / slug
        write_native(d, native, card=d.card)
        # what `dictctl eval` leaves beside the weights; publish turns it into SAELens' sparsity.safetensors (and
        # olah, unlike the Hub, answers a missing file with 401, which SAELens' from_pretrained does not forgive)
        save_file({"frequency": (ours[name].features > 0).float().mean(0)}, native / "density.safetensors")
        for peer in jobs:
            if peer == "sparsify" and kind != "topk":
                continue  # sparsify holds TopK only: convert says so (a FormatError), nothing to load
            convert(native, tmp / peer / slug, to=peer)
            jobs[peer].append({"name": f"{slug}.{peer}", "arch": name, "path": str(tmp / peer / slug),
                               "how": f"{LOADER[peer]} (convert --to {peer})"})
        publish(native, "bench/writers", subfolder=slug, layout="saelens", local_hub=hub)
        jobs["saelens"].append({"name": f"{slug}.hub", "arch": name, "repo": "bench/writers", "sae_id": slug,
                                "how": "SAE.from_pretrained(repo, subfolder) (publish --layout saelens, local hub)"})
    return ours, jobs


def run_peer(peer: str, items: list[dict], tmp: Path, env: dict, loader: str | None = None) -> dict[str, dict | str]:
    """The peer's features and reconstructions per item name, or one line saying why not (`loader`: which of
    peer_loads.LOADERS runs, default the peer's own)."""
    from safetensors.torch import load_file, save_file

    from benchmarks import peers

    python, why = peers.python_for(peer)
    if python is None:
        return {item["name"]: why for item in items}
    job = tmp / f"job-{loader or peer}"
    job.mkdir()
    save_file({"x": inputs()}, job / "x.safetensors")
    (job / "job.json").write_text(json.dumps({"peer": loader or peer, "items": items}))
    done = subprocess.run([python, str(ROOT / "benchmarks" / "peer_loads.py"), str(job)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=job)
    crash = ([line for line in done.stderr.splitlines() if line.strip()] or ["no output"])[-1][:200]
    out = {}
    for item in items:
        result, error = job / f"{item['name']}.safetensors", job / f"{item['name']}.error"
        out[item["name"]] = load_file(result) if result.exists() else \
            error.read_text() if error.exists() else crash
    return out


def run() -> list[dict]:
    from dictionaries.localhub import LocalHub

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-writers-") as tmp:
        tmp = Path(tmp)
        hub = LocalHub(tmp / "hub").start()
        try:
            ours, jobs = write_all(tmp, hub)
            env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp / "hf"),
                   "HF_HUB_DISABLE_TELEMETRY": "1"}
            env.pop("HF_HUB_OFFLINE", None)
            for peer, items in jobs.items():
                results = run_peer(peer, items, tmp, env)
                rows += [row(peer, item, ours[item["arch"]], results[item["name"]]) for item in items]
        finally:
            hub.stop()
    return rows


def row(peer: str, item: dict, ours, theirs: dict | str) -> dict:
    base = {"architecture": item["arch"], "peer": peer, "load path": item["how"]}
    if isinstance(theirs, str):
        return {**base, "verdict": f"not run: {theirs}"}
    diffs = {}
    for key, mine in (("features", ours.features.detach()), ("reconstruction", ours.reconstruction.detach())):
        got = theirs[key].detach()
        diffs[key] = float((got - mine).abs().max()) if got.shape == mine.shape else float("inf")
    scale = max(1.0, float(ours.features.detach().abs().max()), float(ours.reconstruction.detach().abs().max()))
    verdict = "equal" if max(diffs.values()) <= TOLERANCE * scale else "differs"
    return {**base, "features max |diff|": diffs["features"], "reconstruction max |diff|": diffs["reconstruction"],
            "active features (ours)": float((ours.features > 0).float().sum(-1).mean()), "verdict": verdict}


if __name__ == "__main__":
    for r in run():
        print(r)
