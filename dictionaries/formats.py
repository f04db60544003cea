"""Reading and writing dictionary folders: the native format, and conversion from foreign formats.

Native (DESIGN.md section 5): `card.json` (the card) + `weights.safetensors` with the native tensor names
(`W_enc [d_in, d_dict]`, `b_enc [d_dict]`, `W_dec [d_dict, d_in]`, `b_dec [d_in]`, and the kind's extras).
Foreign folders (dictionary_learning, SAELens, sparsify) are read by `<library>_format.py` into native
tensors; this module turns either into a ready `Dictionary` with its card, and writes native folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from dictionaries.card import Card, FileEntry, Files, Provenance, read_card
from dictionaries.constants import CARD_FILE, WEIGHTS_FILE
from dictionaries.errors import (
    ArchitectureMismatchError,
    CardFilesMismatchError,
    FormatError,
    InvalidArgumentError,
    MissingFileError,
    ShapeMismatchError,
)
from dictionaries.files import check_weight_values, sha256_of, write_atomic
from dictionaries.recipe import Dtype, HookPoint, ModelRef

if TYPE_CHECKING:
    import torch

    from dictionaries.architectures import Dictionary
    from dictionaries.foreign_formats import Foreign

FORMATS = ("native", "dictionary_learning", "saelens", "sparsify", "gemma_scope", "llama_scope", "goodfire")

# format -> the files that identify it (all must be present; names or globs), in the order detection tries them.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "native": (CARD_FILE, WEIGHTS_FILE),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("ae.pt",),
    "gemma_scope": ("params.npz",),
    "llama_scope": ("hyperparams.json", "checkpoints/final.safetensors"),
    "goodfire": ("*-SAE-l*.pt*",),  # a glob: the file is named after the model and layer
}


# ---- detection ------------------------------------------------------------------------------------
def detect_format(folder: str | Path) -> str:
    """One of FORMATS: the format whose files the folder holds."""
    folder = _existing_folder(folder)
    for name, files in SIGNATURES.items():
        if all(any(p.is_file() for p in folder.glob(f)) for f in files):
            return name
    looked = "; ".join(f"{name}: {' + '.join(files)}" for name, files in SIGNATURES.items())
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise FormatError(str(folder), f"no supported dictionary format found. Looked for {looked}. "
                                   f"The folder holds: {', '.join(present) or '(nothing)'}")


def _existing_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(str(folder), "Expected a folder holding a dictionary (e.g. card.json + "
                                            "weights.safetensors, or ae.pt + config.json).")
    return folder


# ---- reading --------------------------------------------------------------------------------------
def read_folder(folder: str | Path, *, format: str | None = None, card: Card | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> Dictionary:
    """A ready module from a folder in any supported format, with `.card` set.

    `format` defaults to the card's `files.format` when a card is given, else to `detect_format`. A given
    `card` becomes the module's card and must agree with the files (architecture, sizes, k, pre-encoder
    bias). Without one, a native folder's card.json is used, and a foreign folder gets a card built from
    its config (model and hook point where the config names them), its files hashed.
    """
    folder = _existing_folder(folder)
    fmt = format or (card.files.format if card is not None else None) or detect_format(folder)
    if fmt not in FORMATS:
        raise FormatError(str(folder), f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    if fmt == "native":
        own_card, state, source = _read_native(folder, need_card=card is None)
        check_card_matches(card or own_card, state, source, **_described_by(own_card))
        check_dtype(card or own_card, state, source)
        check_weight_values(state, source)
        card = card or own_card
    else:
        found = foreign_reader(fmt)(folder, architecture=card.architecture if card is not None else None)
        check_weight_values(found.state, str(found.weights))  # before a card is built from them
        card = card or _card_from_foreign(folder, fmt, found)
        state, source = found.state, str(found.weights)
        check_card_matches(card, state, source, **_described_by(found))
    return assemble(card, state, source, device=device, dtype=dtype)


def _read_native(folder: Path, need_card: bool = True) -> tuple[Card | None, dict, str]:
    from dictionaries.files import load_safetensors

    # A registry entry's card comes from the registry, which lists only the weights: card.json is optional then.
    for name in (CARD_FILE, WEIGHTS_FILE) if need_card else (WEIGHTS_FILE,):
        if not (folder / name).is_file():
            raise MissingFileError(str(folder / name), "A native folder holds card.json and weights.safetensors.")
    weights = folder / WEIGHTS_FILE
    own_card = read_card(folder / CARD_FILE) if (folder / CARD_FILE).is_file() else None
    if need_card:  # a local folder is held to its own card (a registry entry's files were checked on fetch)
        verify_files(folder, own_card)
    return own_card, load_safetensors(weights), str(weights)


def _described_by(what: Card | Foreign | None) -> dict:
    """What a folder's own card (native) or config (foreign) says the files are, for check_card_matches."""
    if what is None:
        return {}
    return {"found_architecture": what.architecture, "found_k": what.k,
            "found_pre_encoder_bias": what.pre_encoder_bias}


def verify_files(folder: Path, card: Card) -> None:
    """Every file the card lists is in `folder` with the size and sha256 the card records (those it records)."""
    for item in card.files.items:
        if item.path == CARD_FILE:  # a registry card copied into the folder: card.json cannot hash itself
            continue
        path = folder / item.path  # FileEntry keeps the path inside the folder
        if not path.is_file():
            raise MissingFileError(str(path), "card.json lists it but the folder does not have it.")
        size = path.stat().st_size
        if item.size is not None and size != item.size:
            raise CardFilesMismatchError(str(path), "size", f"{item.size} bytes", f"{size} bytes")
        if item.sha256 is not None and (digest := sha256_of(path)) != item.sha256:
            raise CardFilesMismatchError(str(path), "sha256", item.sha256, digest)


def check_dtype(card: Card, state: dict, source: str) -> None:
    """A native folder's tensors are stored in the dtype its card records."""
    for name, tensor in state.items():
        found = str(tensor.dtype).removeprefix("torch.")
        if found != card.dtype:
            raise CardFilesMismatchError(source, f"the dtype of {name!r}", card.dtype, found)


def check_card_matches(card: Card, state: dict, source: str, *, found_architecture: str | None = None,
                       found_k: int | None = None, found_pre_encoder_bias: bool | None = None) -> None:
    """Raise when a card disagrees with the tensors (and, for foreign files, with what their config says)."""
    for field, found in (("architecture", found_architecture), ("k", found_k),
                         ("pre_encoder_bias", found_pre_encoder_bias)):
        if found is not None and getattr(card, field) != found:
            raise ArchitectureMismatchError(source, card.name, field, getattr(card, field), found)
    if "W_enc" in state and tuple(state["W_enc"].shape) != (card.d_in, card.d_dict):
        raise ShapeMismatchError(f"{source}: tensor 'W_enc' (native layout [d_in, d_dict])",
                                 (card.d_in, card.d_dict), tuple(state["W_enc"].shape),
                                 hint=f"The card of {card.name!r} says d_in={card.d_in}, d_dict={card.d_dict}; "
                                      "is it the card of another dictionary?")
    d_out = card.d_out or card.d_in
    if "W_dec" in state and tuple(state["W_dec"].shape) != (card.d_dict, d_out):
        raise ShapeMismatchError(f"{source}: tensor 'W_dec' (native layout [d_dict, d_out])", (card.d_dict, d_out),
                                 tuple(state["W_dec"].shape), hint=f"The card of {card.name!r} says d_out={d_out}.")
    if "W_enc" in state and ("W_skip" in state) != card.skip:
        raise ArchitectureMismatchError(source, card.name, "skip", card.skip, "W_skip" in state)


def assemble(card: Card, state: dict, source: str, *, device: torch.device | str | None = None,
             dtype: torch.dtype | str | None = None) -> Dictionary:
    """The card's module holding `state` (native names), moved to `device` / `dtype` (default: as stored).

    The module is built on the meta device and the tensors are assigned, not copied, so loading costs
    little more than reading the file.
    """
    import torch

    from dictionaries.architectures import build_dictionary
    from dictionaries.hooks import resolve_device

    if isinstance(dtype, str) and dtype not in get_args(Dtype):
        raise InvalidArgumentError("dtype", dtype, f"expected one of {', '.join(get_args(Dtype))}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (state["W_enc"].dtype if "W_enc" in state else getattr(torch, card.dtype))
    device = resolve_device(device if device is not None else "cpu")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    module = build_dictionary(card, dtype=dtype, device="meta")
    module.load_native_state(state, source)  # checks names and shapes (copies nothing on meta)
    module.load_state_dict(state, assign=True)
    return module.eval()


def _card_from_foreign(folder: Path, fmt: str, found: Foreign) -> Card:
    """A card for an unregistered foreign folder: what its files and config say, nothing more."""
    w_enc, d_out = found.state["W_enc"], found.state["W_dec"].shape[1]
    original = str(folder.resolve())
    transcoder = {"output_hook": HookPoint(**found.output_hook) if found.output_hook else None,
                  "d_out": d_out if d_out != w_enc.shape[0] else None}
    return Card(
        **(transcoder if found.transcoder else {}), skip="W_skip" in found.state,
        name=folder.resolve().name, architecture=found.architecture, d_in=w_enc.shape[0], d_dict=w_enc.shape[1],
        k=found.k, pre_encoder_bias=found.pre_encoder_bias, dtype=str(w_enc.dtype).removeprefix("torch."),
        model=ModelRef(id=found.model) if found.model else None,
        hook=HookPoint(**found.hook) if found.hook else None,
        files=Files(format=fmt, items=[file_entry(p, folder) for p in found.files], source=original),
        provenance=Provenance(original=original, notes=list(found.notes)))


# ---- writing --------------------------------------------------------------------------------------
def write_native(dictionary: Dictionary, folder: str | Path, *, card: Card | None = None) -> Card:
    """Write `weights.safetensors` (native names) and `card.json` into `folder`; return the written card.

    The card is `card`, else `dictionary.card`, else a bare card describing the module; its `files` become
    the one weights file with size and sha256 (format native), the original location kept in
    `files.source`, and `dtype` the stored dtype.
    """
    from safetensors.torch import save

    folder = target_folder(folder)
    card = card or dictionary.card or _bare_card(dictionary, folder)
    state = {k: v.to("cpu") for k, v in dictionary.native_state().items()}
    check_weight_values(state, f"{type(dictionary).__name__} being written to {folder}")
    check_card_matches(card, state, f"{type(dictionary).__name__} being written to {folder}",
                       found_architecture=dictionary.architecture, found_k=getattr(dictionary, "k", None),
                       found_pre_encoder_bias=dictionary.pre_encoder_bias)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    write_atomic(weights, save(state, metadata={"format": "pt"}))  # a crash never leaves half a weights file
    source = card.files.source or (card.provenance.original if card.files.format != "native" else None)
    written = card.model_copy(update={
        "files": Files(format="native", items=[file_entry(weights, folder)], source=source),
        "dtype": str(state["W_enc"].dtype).removeprefix("torch.")})
    write_atomic(folder / CARD_FILE, written.to_json())
    return written


def target_folder(folder: str | Path) -> Path:
    """`folder` as a Path, refused when a file is already there (a native dictionary is a folder)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError("destination", str(folder), "a file is there; give a folder (new, or holding "
                                                               "a dictionary to replace)")
    return folder


def file_entry(path: Path, root: Path) -> FileEntry:
    """A FileEntry for `path` (relative to `root`), hashed now."""
    return FileEntry(path=path.relative_to(root).as_posix(), size=path.stat().st_size, sha256=sha256_of(path))


def _bare_card(dictionary: Dictionary, folder: Path) -> Card:
    return Card(name=folder.resolve().name or "dictionary", architecture=dictionary.architecture, d_in=dictionary.d_in,
                d_dict=dictionary.d_dict, k=getattr(dictionary, "k", None),
                pre_encoder_bias=dictionary.pre_encoder_bias, skip=dictionary.W_skip is not None,
                files=Files(items=[]))  # no output hook known: an SAE


def convert(src: str | Path, dst: str | Path, *, format: str | None = None, hook: Any = None,
            to: str = "native") -> Card:
    """Read a folder in any supported format and write it to `dst` as a native folder (or, `to`, in another
    library's layout: foreign_writers.py); the written card. `hook` (a module path or (site, layer), see
    hook_choice.py) is recorded as the card's hook point."""
    from dictionaries.hook_choice import card_hook

    if to != "native":
        from dictionaries.foreign_writers import WRITABLE

        if to not in WRITABLE:
            raise InvalidArgumentError("--to", to, f"expected one of native, {', '.join(WRITABLE)}")
    target_folder(dst)  # before the source is read
    dictionary = read_folder(src, format=format)
    if hook is not None:
        dictionary.card = dictionary.card.model_copy(update={"hook": card_hook(dictionary.card, hook)})
    return write_native(dictionary, dst) if to == "native" else write_foreign(dictionary, dst, to)


def write_foreign(dictionary: Dictionary, folder: str | Path, to: str) -> Card:
    """Write `dictionary` into `folder` in library `to`'s layout (foreign_writers.py; each file atomically); the card
    describing the written files (format `to`, each file hashed)."""
    from dictionaries.foreign_writers import layout_files, sparsify_note

    folder = target_folder(folder)
    card = dictionary.card or _bare_card(dictionary, folder)
    files = layout_files(dictionary, to, card)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(folder / name, data)
    notes = [*card.provenance.notes, *([sparsify_note(card)] if to == "sparsify" else [])]
    return card.model_copy(update={
        "files": Files(format=to, items=[file_entry(folder / n, folder) for n in files],
                       source=card.files.source or card.provenance.original),
        "provenance": card.provenance.model_copy(update={"notes": notes})})


def summarize(card: Card) -> str:
    """A few lines saying what a card describes (what `dictctl convert` prints)."""
    hook = f"{card.hook.module} ({card.hook.io})" if card.hook else "unknown (set it in card.json)"
    if card.output_hook is not None:
        hook += (f" -> {card.output_hook.module} ({card.output_hook.io}), "
                 f"{'skip-' if card.skip else ''}transcoder, d_out={card.d_out or card.d_in}")
    lines = [f"{card.name}: {card.architecture} dictionary, d_in={card.d_in}, d_dict={card.d_dict}"
             + (f", k={card.k}" if card.k is not None else "") + f", {card.dtype}",
             f"model: {card.model.id if card.model else 'unknown (set it in card.json)'}; hook: {hook}",
             "files: " + ", ".join(f"{f.path} ({f.size} bytes, sha256 {f.sha256})" for f in card.files.items)]
    if card.files.source:
        lines.append(f"converted from: {card.files.source}")
    lines += [f"note: {n}" for n in card.provenance.notes]
    return "\n".join(lines)


def foreign_reader(fmt: str):
    """The reader function of a foreign format (imported on demand: each pulls in only its own library's rules)."""
    if fmt == "dictionary_learning":
        from dictionaries.dictionary_learning_format import read_dictionary_learning as reader
    elif fmt == "saelens":
        from dictionaries.saelens_format import read_saelens as reader
    elif fmt == "sparsify":
        from dictionaries.sparsify_format import read_sparsify as reader
    elif fmt == "gemma_scope":
        from dictionaries.gemma_scope_format import read_gemma_scope as reader
    elif fmt == "llama_scope":
        from dictionaries.llama_scope_format import read_llama_scope as reader
    elif fmt == "goodfire":
        from dictionaries.goodfire_format import read_goodfire as reader
    else:
        raise FormatError(fmt, f"no reader for format {fmt!r}")
    return reader
