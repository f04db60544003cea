"""Malformed inputs for tests/test_cli_fuzz.py: a folder of broken cards, weights, registries and files.

`build_world(root, model, tokenizer)` writes every input the fuzz cases name, each a small variation of one
valid native folder (`good`, d_in 8) or of one valid one-entry registry, so that each case breaks exactly one
thing. `good64` is a native folder that fits the toy model (d_in 64) and `model/` the toy model itself, so
that commands which would run a model get that far when nothing else stops them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from dictionaries.constants import CARD_FILE, WEIGHTS_FILE
from dictionaries.formats import write_native
from training.toymodel import corpus_documents

from helpers import make_dictionary, make_folder

REV = "0" * 40
SMALL_RECIPE = ("batch_size: 128\nbuffer_contexts: 16\nharvest_batch_size: 8\ncontext_length: 32\nd_dict: 64\n"
                "optimizer: {warmup_steps: 2}\n")


def _hash(folder: Path, card: dict) -> None:
    """Point the card's weights entry at the file as it is now (so a case breaks the content, not the hash)."""
    path = folder / WEIGHTS_FILE
    card["files"]["items"] = [{"path": WEIGHTS_FILE, "size": path.stat().st_size,
                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]


def variant(w: Path, name: str, *, weights=None, card=None, rehash: bool = True) -> None:
    """A copy of `good` with its weights replaced (bytes, a function of the bytes, or tensors) and/or its card
    edited in place (`card(dict)`; returning bytes writes those instead)."""
    dst = w / name
    shutil.copytree(w / "good", dst)
    path = dst / WEIGHTS_FILE
    if isinstance(weights, dict):
        save_file(weights, str(path))
    elif callable(weights):
        path.write_bytes(weights(path.read_bytes()))
    elif weights is not None:
        path.write_bytes(weights)
    data = json.loads((dst / CARD_FILE).read_text())
    if rehash:
        _hash(dst, data)
    raw = card(data) if card is not None else None
    (dst / CARD_FILE).write_bytes(raw if isinstance(raw, bytes) else json.dumps(data).encode())


def _set(path: str, value):
    """A card edit setting a dotted field (`files.items.0.size`) to `value`."""
    def edit(card: dict) -> None:
        *head, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = card
        for part in head:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
        node[last] = value
    return edit


def _drop(field: str):
    return lambda card: card.pop(field)


# card edits: case id -> edit (the folder is compared, converted or published by the cases)
CARD_EDITS = {
    "name-int": _set("name", 5), "aliases-str": _set("aliases", "x"),
    "architecture-unknown": _set("architecture", "lstm"),
    "d_in-str": _set("d_in", "wide"), "d_in-zero": _set("d_in", 0), "d_in-huge": _set("d_in", 10**30),
    "d_dict-negative": _set("d_dict", -1), "d_dict-float": _set("d_dict", 1.5), "k-on-relu": _set("k", 4),
    "pre_encoder_bias-str": _set("pre_encoder_bias", "maybe"), "dtype-float128": _set("dtype", "float128"),
    "dtype-int": _set("dtype", 7), "license-int": _set("license", 5), "authors-str": _set("authors", "me"),
    "links-unknown": _set("links.blog", "x"), "model-str": _set("model", "pythia"), "model-no-id": _set("model", {}),
    "hook-site": _set("hook.site", "tail"), "hook-io": _set("hook.io", "both"), "hook-unknown": _set("hook.when", 1),
    "files-missing": _drop("files"), "files-format": _set("files.format", "onnx"),
    "files-absolute": _set("files.items.0.path", "/etc/passwd"), "files-dotdot": _set("files.items.0.path", "../x"),
    "files-sha-bad": _set("files.items.0.sha256", "xyz"), "files-size-negative": _set("files.items.0.size", -1),
    "files-size-str": _set("files.items.0.size", "big"), "stats-source": _set("stats.source", "guessed"),
    "stats-no-reference": _set("stats.source", "reported"), "stats-l0-str": _set("stats.l0", "many"),
    "stats-unknown": _set("stats.loss", 1.0), "recipe-incomplete": _set("recipe", {"preset": "topk"}),
    "provenance-notes-str": _set("provenance.notes", "x"), "unknown-field": _set("colour", "blue"),
    "card-list": lambda c: b"[1, 2]", "card-not-json": lambda c: b"{name: ", "card-empty": lambda c: b"",
    "card-latin1": lambda c: b'{"name": "caf\xe9"}',
}


def build_weights(w: Path) -> None:
    """Native folders whose weights file is broken in one way each (the card hashes it, unless said)."""
    good = load_file(str(w / "good" / WEIGHTS_FILE))
    variant(w, "w-empty", weights=b"")
    variant(w, "w-truncated", weights=lambda b: b[: len(b) // 2])
    variant(w, "w-garbage", weights=bytes(range(256)) * 4)
    variant(w, "w-huge-header", weights=(2**60).to_bytes(8, "little") + b"{}")
    variant(w, "w-names", weights={("encoder" if k == "W_enc" else k): v for k, v in good.items()})
    variant(w, "w-shapes", weights={**good, "W_enc": torch.zeros(4, 16)})
    variant(w, "w-int32", weights={k: v.to(torch.int32) for k, v in good.items()})
    variant(w, "w-int32-card", weights={k: v.to(torch.int32) for k, v in good.items()}, card=_set("dtype", "int32"))
    variant(w, "w-float16", weights={k: v.half() for k, v in good.items()})
    nan = good["W_dec"].clone().index_fill_(0, torch.tensor([3]), float("nan"))  # one feature's decoder row
    variant(w, "w-nan", weights={**good, "W_dec": nan})
    variant(w, "w-inf", weights={**good, "b_enc": torch.full_like(good["b_enc"], float("inf"))})
    variant(w, "w-missing", weights={k: v for k, v in good.items() if k != "b_dec"})
    variant(w, "w-wrong-hash", card=_set("files.items.0.sha256", "0" * 64))
    variant(w, "w-wrong-size", card=lambda c: c["files"]["items"][0].update(size=c["files"]["items"][0]["size"] + 1))
    for name, edit in CARD_EDITS.items():
        variant(w, f"c-{name}", card=edit)
    (w / "only-weights").mkdir()
    shutil.copy(w / "good" / WEIGHTS_FILE, w / "only-weights" / WEIGHTS_FILE)
    for name, files in {"f-saelens": {"cfg.json": b"{}", "sae_weights.safetensors": b"garbage"},
                        "f-sparsify": {"cfg.json": b"{not json", "sae.safetensors": b"garbage"},
                        "f-dl-garbage": {"ae.pt": b"garbage"},
                        "f-dl-truncated": {"ae.pt": _pickled(good)[:200]},
                        "f-dl-config-latin1": {"ae.pt": _pickled(good), "config.json": b'{"trainer": "\xe9"}'}}.items():
        (w / name).mkdir()
        for file, content in files.items():
            (w / name / file).write_bytes(content)


def _pickled(state: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


# registry edits: case id -> (registry.yaml text edit, card file text edit)
def _card_yaml(w: Path) -> dict:
    card = json.loads((w / "good" / CARD_FILE).read_text())
    card["name"] = "toy/mlp0/16"
    return card


def build_registries(w: Path) -> None:
    """One-entry registries, each broken in one way; `reg-good` is the valid one."""
    entry = {"card": "toy/mlp0/16.yaml", "location": {"kind": "hub", "repo": "org/toy", "revision": REV}}
    good_index = {"version": 1, "entries": {"toy/mlp0/16": entry}}
    card_text = yaml.safe_dump(_card_yaml(w))
    cases = {
        "good": (good_index, card_text),
        "bad-yaml": ("entries: [unclosed\n", card_text),
        "duplicate": ("version: 1\nentries:\n  toy/mlp0/16: " + json.dumps(entry) + "\n  toy/mlp0/16: "
                      + json.dumps(entry) + "\n", card_text),
        "unknown-entry-field": ({**good_index, "entries": {"toy/mlp0/16": {**entry, "mirror": True}}}, card_text),
        "unknown-top-field": ({**good_index, "owner": "me"}, card_text),
        "missing-card": ({**good_index, "entries": {"toy/mlp0/16": {**entry, "card": "none.yaml"}}}, card_text),
        "branch-revision": ({**good_index, "entries": {"toy/mlp0/16": {
            **entry, "location": {**entry["location"], "revision": "main"}}}}, card_text),
        "latin1": (b"version: 1\n# caf\xe9\nentries: {}\n", card_text),
        "card-latin1": (good_index, b"name: caf\xe9\n"),
        "card-bad-yaml": (good_index, "name: [unclosed\n"),
        "card-mismatch": (good_index, card_text.replace("toy/mlp0/16", "toy/mlp1/16")),
        "empty": ("", card_text),
        "list": ("- 1\n- 2\n", card_text),
        "version": ({**good_index, "version": 2}, card_text),
        "bad-name": ({**good_index, "entries": {"Toy Name": entry}}, card_text),
        "absolute-card": ({**good_index, "entries": {"toy/mlp0/16": {**entry, "card": str(w / "abs-card.yaml")}}},
                          card_text),
        "dotdot-card": ({**good_index, "entries": {"toy/mlp0/16": {**entry, "card": "../abs-card.yaml"}}}, card_text),
        "location-kind": ({**good_index, "entries": {"toy/mlp0/16": {**entry, "location": {"kind": "ftp"}}}},
                          card_text),
        "no-entries": ({"version": 1}, card_text),
    }
    (w / "abs-card.yaml").write_text(card_text)
    for name, (index, card) in cases.items():
        root = w / f"reg-{name}"
        (root / "cards" / "toy" / "mlp0").mkdir(parents=True)
        text = index if isinstance(index, (str, bytes)) else yaml.safe_dump(index, sort_keys=False)
        (root / "registry.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        (root / "cards" / "toy" / "mlp0" / "16.yaml").write_bytes(card if isinstance(card, bytes) else card.encode())


def build_world(w: Path, model, tokenizer) -> None:
    """Every input the fuzz cases name, under `w`."""
    make_folder(w / "good")
    d = make_dictionary(64, 128, "gpt_neox.layers.0.mlp", model_id=str(w / "model"))
    write_native(d, w / "good64")
    model.save_pretrained(w / "model")
    tokenizer.save_pretrained(w / "model")
    build_weights(w)
    build_registries(w)
    (w / "corpus.txt").write_text("\n\n".join(corpus_documents()))
    (w / "small.yaml").write_text(SMALL_RECIPE)
    (w / "recipe-bad.yaml").write_text("tokens: [1,\n")
    (w / "recipe-list.yaml").write_text("- tokens\n")
    (w / "recipe-latin1.yaml").write_bytes(b"tokens: 1 # caf\xe9\n")
    (w / "recipe-unknown.yaml").write_text(SMALL_RECIPE + "learning_rate: 0.1\n")
    (w / "texts.txt").write_text("The for statement is used to iterate\nPython objects are\n")
    (w / "empty.txt").write_text("\n   \n")
    (w / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (w / "a-file").write_text("not a folder\n")
    ckpt = w / "corrupt-run" / "checkpoint"
    (ckpt / "step-5").mkdir(parents=True)
    (ckpt / "latest").write_text("step-5")
    (ckpt / "step-5" / "trainers.pt").write_bytes(_pickled({"step": 5})[:100])
    (ckpt / "step-5" / "rank0.pt").write_bytes(b"")
