"""Generate the registry cards of the public releases people load most, from the facts transcribed below.

Run from the repository root: `python cards/releases.py` (then `ruff check .` and the registry tests).
It writes one card per dictionary under cards/ and its block in registry.yaml (replacing what it wrote
before; other entries and comments are kept), then validates the whole registry once. Nothing is downloaded:
none of these files could be fetched where the cards were written, so every entry is `revision: null`
(unpinned) with no hashes, and `dictctl pin` records both wherever the Hub is reachable. It also sets
`links.neuronpedia` (and the Neuronpedia id as an alias) on the Pythia-70m Sparse Feature Circuits cards.

Every fact comes from a public source named beside it; a stat no source gives is left absent. The table
rows below are those sources' numbers, transcribed (not computed); reported stats carry `source: reported`
and the reference they were read in.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dictionaries.card import Card  # noqa: E402
from dictionaries.hookpoints import saelens_hook, sparsify_hook  # noqa: E402
from dictionaries.locations import HubLocation  # noqa: E402
from dictionaries.registration import _replace_entry, card_text, entry_block  # noqa: E402
from dictionaries.registry import Registry  # noqa: E402

SAELENS_COMMIT = "91ca16ccd0684e4dd6323cd4f23ded734339ec54"
SAELENS_YAML = f"https://github.com/jbloomAus/SAELens/blob/{SAELENS_COMMIT}/sae_lens/pretrained_saes.yaml"
"""SAELens' release list at the commit read (22 Oct 2025): repos, folder paths, hook names, Neuronpedia ids,
and the L0 / variance explained its authors list for each SAE."""
SAELENS_LOADERS = f"https://github.com/jbloomAus/SAELens/blob/{SAELENS_COMMIT}/sae_lens/loading/pretrained_sae_loaders.py"
"""SAELens' loaders: Gemma Scope's and Llama Scope's configs (architecture, d_in, b_dec not applied to the input)."""
SAELENS_TEST = f"https://github.com/jbloomAus/SAELens/blob/{SAELENS_COMMIT}/tests/loading/test_pretrained_sae_loaders.py"
"""SAELens' test of gpt2-small-res-jb's cfg.json: d_in 768, d_sae 24576, apply_b_dec_to_input true, float32."""
UNPINNED = ("Unpinned: the files could not be fetched where this card was written (no network), so their commit "
            "and hashes are unknown; `dictctl pin` records both.")

# ---- GPT-2 small res-jb: SAELens release gpt2-small-res-jb (SAELENS_YAML) -----------------------------------
# (hook name, L0, variance explained) as listed there; Neuronpedia numbers them 0..12 in this order.
GPT2_RES_JB = [("blocks.0.hook_resid_pre", 10.0, 0.999), ("blocks.1.hook_resid_pre", 10.0, 0.999),
               ("blocks.2.hook_resid_pre", 18.0, 0.999), ("blocks.3.hook_resid_pre", 23.0, 0.999),
               ("blocks.4.hook_resid_pre", 31.0, 0.9), ("blocks.5.hook_resid_pre", 41.0, 0.9),
               ("blocks.6.hook_resid_pre", 51.0, 0.9), ("blocks.7.hook_resid_pre", 54.0, 0.9),
               ("blocks.8.hook_resid_pre", 60.0, 0.9), ("blocks.9.hook_resid_pre", 70.0, 0.77),
               ("blocks.10.hook_resid_pre", 52.0, 0.77), ("blocks.11.hook_resid_pre", 56.0, 0.77),
               ("blocks.11.hook_resid_post", 70.0, 0.77)]
# ---- Gemma Scope 2b residual, canonical: SAELens release gemma-scope-2b-pt-res-canonical (SAELENS_YAML) --------
# layer -> N of the folder layer_L/width_W/average_l0_N that "canonical" names; N is the average L0 its
# authors give the SAE in the folder's name.
GEMMA_16K = [105, 102, 141, 59, 124, 68, 70, 69, 71, 73, 77, 80, 82, 84, 84, 78, 78, 77, 74, 73, 71, 70, 72, 75,
             73, 116]
GEMMA_65K = [73, 121, 77, 89, 89, 105, 107, 107, 111, 118, 128, 70, 72, 75, 73, 127, 128, 125, 116, 115, 114, 111,
             116, 123, 124, 93]
# ---- Llama Scope LXR 8x: SAELens release llama_scope_lxr_8x (SAELENS_YAML): 32 layers, L0 50 listed for each --
LLAMA_SCOPE_LAYERS, LLAMA_SCOPE_L0 = 32, 50.0
# ---- EleutherAI sae-llama-3-8b-32x: cfg.json of layers 0, 9, 16, 19, 21 and 30 read on the Hub (d_in 4096,
# expansion_factor 32, k 192); folders layers.L after the repo's commit 3292654 ("Replace underscore with dot").
ELEUTHER_LLAMA_LAYERS, ELEUTHER_LLAMA_K = 32, 192
ELEUTHER_LLAMA_BF16 = {3}
# ---- EleutherAI sae-pythia-70m-deduped-32k: folders layers.N (block outputs), layers.N.mlp and
# layers.N.attention; 32768 latents, TopK 16 (stated for layers.3 at the repo's commit 7a64bad).
ELEUTHER_PYTHIA = "https://huggingface.co/EleutherAI/sae-pythia-70m-deduped-32k/tree/" \
                  "7a64bade597212176dfe0782f9d839b94f0addaf/layers.3"
ELEUTHER_PYTHIA_LAYERS, ELEUTHER_PYTHIA_K = 6, 16
# ---- Pythia-70m Sparse Feature Circuits sets: Neuronpedia ids (SAELENS_YAML, releases pythia-70m-deduped-*-sm)
SFC_NEURONPEDIA = {"mlp": "mlp-sm", "attn": "att-sm", "resid": "res-sm"}


def _entry(name: str, *, aliases: list[str], architecture: str, d_in: int, d_dict: int, model: str, hook: dict,
           files: dict, location: HubLocation, links: dict, authors: list[str], provenance: dict,
           stats: dict | None = None, k: int | None = None, pre_encoder_bias: bool = True, dtype: str = "float32",
           license: str | None = None) -> tuple[Card, HubLocation]:
    """One validated card and its (unpinned) location."""
    data = {"name": name, "aliases": [a.lower() for a in aliases], "architecture": architecture, "d_in": d_in,
            "d_dict": d_dict, "k": k, "pre_encoder_bias": pre_encoder_bias, "dtype": dtype, "license": license,
            "authors": authors, "links": links, "model": {"id": model}, "hook": hook, "files": files,
            "stats": stats, "provenance": {**provenance, "notes": [*provenance.get("notes", []), UNPINNED]}}
    return Card.model_validate({k_: v for k_, v in data.items() if v is not None}), location


def gpt2_res_jb() -> list[tuple[Card, HubLocation]]:
    """GPT-2 small's residual-stream SAEs by Joseph Bloom: 12 resid_pre and the last resid_post, 24576 each."""
    repo, out = "jbloom/GPT2-Small-SAEs-Reformatted", []
    for number, (hook_name, l0, ve) in enumerate(GPT2_RES_JB):
        hook = saelens_hook("gpt2", hook_name)
        where = "embed" if hook["site"] == "embed" else f"resid{hook['layer']}"
        np_id = f"gpt2-small/{number}-res-jb"
        out.append(_entry(
            f"gpt2/{where}/24576-jb", aliases=[f"gpt2-small-res-jb/{hook_name}", np_id], architecture="relu",
            d_in=768, d_dict=24576, model="gpt2", hook=hook,
            files={"format": "saelens", "items": [{"path": "cfg.json"}, {"path": "sae_weights.safetensors"}],
                   "source": f"hf://{repo}/{hook_name}"},
            location=HubLocation(repo=repo, revision=None, subfolder=hook_name),
            links={"paper": "https://www.lesswrong.com/posts/f9EgfLSurAiqRJySD/open-source-sparse-autoencoders-"
                            "for-all-residual-stream", "code": "https://github.com/jbloomAus/SAELens",
                   "neuronpedia": np_id},
            authors=["Joseph Bloom"],
            stats={"source": "reported", "reference": SAELENS_YAML, "l0": l0, "variance_explained": ve},
            provenance={"trained_by": "Joseph Bloom", "original": f"hf://{repo}/{hook_name}", "notes": [
                f"SAELens release gpt2-small-res-jb, SAE id {hook_name} ({SAELENS_YAML}); d_in, d_sae, "
                f"apply_b_dec_to_input and dtype from {SAELENS_TEST}.",
                "SAELens loads GPT-2 for these with center_writing_weights=True (TransformerLens): that model's "
                "residual stream is the Hugging Face model's with its mean over d_model removed at each token."]}))
    return out


def gemma_scope() -> list[tuple[Card, HubLocation]]:
    """Gemma Scope's canonical residual-stream JumpReLU SAEs for Gemma 2 2B, widths 16k and 65k, all 26 layers."""
    repo, out = "google/gemma-scope-2b-pt-res", []
    for width, d_dict, table in (("16k", 16384, GEMMA_16K), ("65k", 65536, GEMMA_65K)):
        for layer, l0 in enumerate(table):
            folder = f"layer_{layer}/width_{width}/average_l0_{l0}"
            np_id = f"gemma-2-2b/{layer}-gemmascope-res-{width}"
            out.append(_entry(
                f"gemma2-2b/resid{layer}/{d_dict}",
                aliases=[f"gemma-scope-2b-pt-res-canonical/layer_{layer}/width_{width}/canonical",
                         f"gemma-scope-2b-pt-res/{folder}", np_id],
                architecture="jumprelu", d_in=2304, d_dict=d_dict, model="google/gemma-2-2b",
                hook=saelens_hook("google/gemma-2-2b", f"blocks.{layer}.hook_resid_post"),
                files={"format": "gemma_scope", "items": [{"path": "params.npz"}], "source": f"hf://{repo}/{folder}"},
                location=HubLocation(repo=repo, revision=None, subfolder=folder), pre_encoder_bias=False,
                links={"paper": "https://huggingface.co/google/gemma-scope", "neuronpedia": np_id},
                authors=["Google DeepMind"],
                stats={"source": "reported", "reference": SAELENS_YAML, "l0": float(l0)},
                provenance={"trained_by": "Google DeepMind (Gemma Scope)", "original": f"hf://{repo}/{folder}",
                            "notes": [f"SAELens release gemma-scope-2b-pt-res-canonical, SAE id layer_{layer}/"
                                      f"width_{width}/canonical -> {folder} ({SAELENS_YAML}); the L0 is the "
                                      "average L0 in the folder's name. Architecture, d_in and no b_dec "
                                      f"subtraction before encoding from {SAELENS_LOADERS}."]}))
    return out


def llama_scope() -> list[tuple[Card, HubLocation]]:
    """Llama Scope's residual-stream SAEs for Llama 3.1 8B, 8x (32768 features), all 32 layers."""
    repo, out = "fnlp/Llama3_1-8B-Base-LXR-8x", []
    for layer in range(LLAMA_SCOPE_LAYERS):
        folder = f"Llama3_1-8B-Base-L{layer}R-8x"
        np_id = f"llama3.1-8b/{layer}-llamascope-res-32k"
        out.append(_entry(
            f"llama3.1-8b/resid{layer}/32768", aliases=[f"llama_scope_lxr_8x/l{layer}r_8x", np_id],
            architecture="jumprelu", d_in=4096, d_dict=32768, model="meta-llama/Llama-3.1-8B",
            hook=saelens_hook("meta-llama/Llama-3.1-8B", f"blocks.{layer}.hook_resid_post"),
            files={"format": "llama_scope", "items": [{"path": "hyperparams.json"},
                                                      {"path": "checkpoints/final.safetensors"}],
                   "source": f"hf://{repo}/{folder}"},
            location=HubLocation(repo=repo, revision=None, subfolder=folder), pre_encoder_bias=False,
            dtype="bfloat16", links={"paper": "https://arxiv.org/abs/2410.20526", "neuronpedia": np_id},
            authors=["Fudan NLP (fnlp), Llama Scope"],
            stats={"source": "reported", "reference": SAELENS_YAML, "l0": LLAMA_SCOPE_L0},
            provenance={"trained_by": "Fudan NLP (fnlp), Llama Scope", "original": f"hf://{repo}/{folder}", "notes": [
                f"SAELens release llama_scope_lxr_8x, SAE id l{layer}r_8x ({SAELENS_YAML}); LXR is the residual "
                "stream leaving block L. JumpReLU with one threshold for all features, bfloat16, inputs scaled "
                "by sqrt(d_model) / the dataset's average input norm (hyperparams.json), as SAELens' loader "
                f"reads them ({SAELENS_LOADERS}). bfloat16 agrees with the file's size: 537 MB for two "
                "32768 x 4096 matrices (https://huggingface.co/fnlp/Llama3_1-8B-Base-LXR-8x/tree/"
                "d8e0a6a0c8aa0489a7ebde75c86427de91ab8f86/Llama3_1-8B-Base-L1R-8x/checkpoints)."]}))
    return out


def eleuther_llama3() -> list[tuple[Card, HubLocation]]:
    """EleutherAI's sparsify TopK SAEs on Llama 3 8B's residual stream, 32x (131072 features), all 32 layers."""
    repo, out = "EleutherAI/sae-llama-3-8b-32x", []
    for layer in range(ELEUTHER_LLAMA_LAYERS):
        folder = f"layers.{layer}"
        out.append(_entry(
            f"llama3-8b/resid{layer}/131072-eleuther", aliases=[f"{repo}/{folder}"], architecture="topk",
            k=ELEUTHER_LLAMA_K, d_in=4096, d_dict=4096 * 32, model="meta-llama/Meta-Llama-3-8B",
            hook=sparsify_hook("meta-llama/Meta-Llama-3-8B", folder),
            files={"format": "sparsify", "items": [{"path": "cfg.json"}, {"path": "sae.safetensors"}],
                   "source": f"hf://{repo}/{folder}"},
            location=HubLocation(repo=repo, revision=None, subfolder=folder), license="MIT",
            dtype="bfloat16" if layer in ELEUTHER_LLAMA_BF16 else "float32",
            links={"code": "https://github.com/EleutherAI/sparsify"}, authors=["EleutherAI"],
            provenance={"trained_by": "EleutherAI", "original": f"hf://{repo}/{folder}", "notes": [
                f"https://huggingface.co/{repo}: MIT, trained on togethercomputer/RedPajama-Data-1T-Sample; "
                "cfg.json of layers 0, 9, 16, 19, 21 and 30 read (expansion_factor 32, k 192, d_in 4096), the "
                "others assumed alike (the reader checks each cfg.json against this card on load).",
                "dtype from the file sizes the Hub lists: sae.safetensors is 4.3 GB (float32: two 131072 x 4096 "
                "matrices) for each layer seen, except layer 3, 2.15 GB after the commit e8d1ac4 'Convert layer "
                "3 to bf16'.",
                "The repo names its model only as llama-3-8b; meta-llama/Meta-Llama-3-8B is the model public "
                "code loading this release pairs it with."]}))
    return out


def eleuther_pythia() -> list[tuple[Card, HubLocation]]:
    """EleutherAI's sparsify TopK SAEs on Pythia-70m-deduped's block outputs, 32768 latents, all 6 layers."""
    repo, out = "EleutherAI/sae-pythia-70m-deduped-32k", []
    for layer in range(ELEUTHER_PYTHIA_LAYERS):
        folder = f"layers.{layer}"
        out.append(_entry(
            f"pythia70m/resid{layer}/32768-eleuther", aliases=[f"{repo}/{folder}"], architecture="topk",
            k=ELEUTHER_PYTHIA_K, d_in=512, d_dict=32768, model="EleutherAI/pythia-70m-deduped",
            hook=sparsify_hook("EleutherAI/pythia-70m-deduped", folder),
            files={"format": "sparsify", "items": [{"path": "cfg.json"}, {"path": "sae.safetensors"}],
                   "source": f"hf://{repo}/{folder}"},
            location=HubLocation(repo=repo, revision=None, subfolder=folder),
            links={"code": "https://github.com/EleutherAI/sparsify"}, authors=["EleutherAI"],
            provenance={"trained_by": "EleutherAI", "original": f"hf://{repo}/{folder}", "notes": [
                f"{ELEUTHER_PYTHIA}: 32768 latents, TopK 16 (seen for layers.3; the other layers assumed alike, "
                "and the reader checks each cfg.json against this card on load). The repo's commit 7a64bade5972"
                "12176dfe0782f9d839b94f0addaf uploaded the folders (Aug 2024); `dictctl pin` records the current one.",
                "The repo also holds layers.N.mlp and layers.N.attention (MLP and attention outputs), not listed "
                "here: no source at hand states their k."]}))
    return out


def sfc_links(registry: Registry) -> int:
    """Add the Neuronpedia id (link and alias) to the Pythia-70m Sparse Feature Circuits cards, editing their
    text so that nothing else in them changes; not the embedding's: SAELens lists `e-att-sm` for its
    `e-res-sm` folder, which no source here confirms. The number of cards changed."""
    changed = 0
    for entry in registry.entries.values():
        if not entry.name.endswith("-sfc") or entry.site not in SFC_NEURONPEDIA:
            continue
        np_id = f"pythia-70m-deduped/{entry.layer}-{SFC_NEURONPEDIA[entry.site]}"
        path = registry.cards_dir / f"{entry.name}.yaml"
        lines = path.read_text().splitlines(keepends=True)
        if any(line.startswith("  neuronpedia:") for line in lines):
            continue
        lines = _after_block(lines, "links:\n", "  ", f"  neuronpedia: {np_id}\n")
        lines = _after_block(lines, "aliases:\n", "- ", f"- {np_id}\n")
        path.write_text("".join(lines))
        changed += 1
    return changed


def _after_block(lines: list[str], head: str, indent: str, new: str) -> list[str]:
    """`lines` with `new` added at the end of the top-level block opened by the line `head`."""
    at = lines.index(head) + 1
    while at < len(lines) and lines[at].startswith(indent):
        at += 1
    return [*lines[:at], new, *lines[at:]]


def write(entries: list[tuple[Card, HubLocation]], registry_path: Path) -> None:
    """Every card under cards/ and its block in registry.yaml, then the whole registry validated once."""
    text = registry_path.read_text()
    for card, location in entries:
        card_rel = f"{card.name}.yaml"
        path = registry_path.parent / "cards" / card_rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(card_text(card))
        text = _replace_entry(text, card.name, entry_block(card.name, card_rel, location))
    registry_path.write_text(text)
    Registry(registry_path)


def main() -> None:
    registry_path = ROOT / "registry.yaml"
    entries = [*gpt2_res_jb(), *gemma_scope(), *llama_scope(), *eleuther_llama3(), *eleuther_pythia()]
    write(entries, registry_path)
    linked = sfc_links(Registry(registry_path))
    Registry(registry_path)
    print(f"{len(entries)} cards written, {linked} Neuronpedia links added; registry.yaml validates")


if __name__ == "__main__":
    main()
