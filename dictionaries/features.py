"""What a dictionary's features do on text: `features_of`, `inspect_feature` and the `FeatureReport` it returns.

Outside any trace: texts are tokenized with the wrapped model's tokenizer, padded into batches, and the
dictionary's hook point is read with `hooks.collect_activations` (one forward per batch, stopped after the
hook). `inspect_feature` adds the top-activating contexts and a logit lens of the feature's decoder
direction: unembed(final_norm(W_dec[i])), the tokens the feature promotes and suppresses when written into
the residual stream (nostalgebraist 2020, *interpreting GPT: the logit lens*; as in Bricken et al. 2023's
feature pages, which show the logit weights of each feature's decoder direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictionaries.errors import (
    CardError,
    FeatureIndexError,
    FormatError,
    HookPointError,
    InvalidArgumentError,
    MissingFileError,
    NotWrappedError,
)
from dictionaries.recipe import HookPoint, Strict

if TYPE_CHECKING:  # torch is imported where it is used: `dictctl inspect` checks its arguments without it
    import torch
    from torch import Tensor, nn

    from dictionaries.architectures import Dictionary


class FeatureExample(Strict):
    """One place where the feature fires: a window of tokens around the activating one."""

    text: int
    """Index of the text in the list given."""
    position: int
    """Token position of the activating token in that text (pad dropped)."""
    activation: float
    """The feature's activation there."""
    tokens: list[str]
    """The decoded tokens of the window, in order."""
    marked: int
    """Index in `tokens` of the activating token."""

    def render(self, open_mark: str = "[[", close_mark: str = "]]") -> str:
        """The window as text with the activating token between the marks."""
        return "".join(f"{open_mark}{t}{close_mark}" if i == self.marked else t for i, t in enumerate(self.tokens))


class TokenScore(Strict):
    """A vocabulary token and its logit-lens score."""

    token: str
    """The decoded token."""
    id: int
    """Its id."""
    score: float
    """Logit contribution of the unit feature direction."""


class FeatureReport(Strict):
    """What a feature responds to (top contexts) and what it writes (logit lens)."""

    dictionary: str
    """Name of the dictionary (its card's name)."""
    feature: int
    """The feature's index."""
    tokens: int
    """Real tokens read."""
    frequency: float
    """Fraction of those tokens where the feature is > 0."""
    examples: list[FeatureExample]
    """Top-activating contexts, strongest first (only where the feature is > 0)."""
    promoted: list[TokenScore]
    """Tokens the decoder direction promotes most; empty where the model has no unembedding of that width."""
    suppressed: list[TokenScore]
    """Tokens it suppresses most."""
    no_lens: str | None = None
    """Why there is no logit lens (promoted and suppressed empty), e.g. a model without an unembedding (a BERT
    encoder loaded as BertModel); None when there is one."""
    neuronpedia: str | None = None
    """The feature's Neuronpedia page, where the card has a Neuronpedia id."""


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise NotWrappedError(type(model).__name__, "a model wrapped with its tokenizer")
    return tok


def _hook_of(dictionary: Dictionary, hook: HookPoint | str | None) -> HookPoint | str:
    card = getattr(dictionary, "card", None)
    hook = hook if hook is not None else (card.hook if card is not None else None)
    if hook is None:
        raise HookPointError("<none>", problem="the dictionary's card names no hook point; pass `hook=`.")
    return hook


def features_of(model: Any, dictionary: Dictionary, texts: Sequence[str], *, batch_size: int = 8,
                progress: bool = True, hook: HookPoint | str | None = None) -> list[Tensor]:
    """Features (len_i, d_dict) of each text at the dictionary's hook point (or `hook`), pad dropped."""
    import torch
    from tqdm.auto import tqdm

    from dictionaries.hooks import check_hook, collect_activations

    hook = _hook_of(dictionary, hook)
    check_hook(model, hook, dictionary.d_in)  # a wrong hook or width fails before any forward
    tok = _tokenizer(model)
    device = dictionary.W_enc.device
    out: list[Tensor] = []
    starts = range(0, len(texts), batch_size)
    bar = tqdm(starts, desc="features", unit="batch", disable=not progress or len(starts) < 2)
    for start in bar:
        enc = tok(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        [x] = collect_activations(model, [hook], ids.to(_model_device(model)), mask.to(_model_device(model)))
        with torch.no_grad():
            f = dictionary.encode(x.to(device=device, dtype=dictionary.W_enc.dtype))   # (batch, pos, F)
        out.extend(row[m.to(row.device).bool()] for row, m in zip(f, mask))
    return out


def _model_device(model: Any) -> torch.device:
    from dictionaries.hooks import torch_model

    return next(torch_model(model).parameters()).device


def _final_norm(hf: nn.Module) -> nn.Module | None:
    """The norm applied before the unembedding: GPT-NeoX `final_layer_norm`, GPT-2 `ln_f`, Llama `norm`."""
    from torch import nn

    base = getattr(hf, "base_model", hf)
    for name in ("final_layer_norm", "ln_f", "norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def lens_problem(model: Any, width: int) -> str | None:
    """Why a direction of `width` has no logit lens in this model (no unembedding, or one of another width);
    None when it has one."""
    from dictionaries.hooks import torch_model

    hf = torch_model(model)
    unembed = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if unembed is None:
        return f"the model ({type(hf).__name__}) has no unembedding (no LM head), so no logit lens"
    reads = getattr(unembed, "in_features", None)
    if reads != width:
        return f"the model's unembedding reads width {reads}, not this hook's {width}, so no logit lens"
    return None


def logit_lens(model: Any, direction: Tensor, *, top: int = 10) -> tuple[list[TokenScore], list[TokenScore]]:
    """(promoted, suppressed) tokens of a residual direction (d,): unembed(final_norm(direction))."""
    import torch

    from dictionaries.hooks import torch_model

    hf = torch_model(model)
    unembed = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if unembed is None or getattr(unembed, "in_features", None) != direction.shape[-1]:
        return [], []
    norm = _final_norm(hf)
    with torch.no_grad():
        d = direction.to(unembed.weight.device, unembed.weight.dtype)[None, None]    # (1, 1, d)
        logits = unembed(norm(d) if norm is not None else d)[0, 0]                    # (vocab,)
    tok = getattr(model, "tokenizer", None)

    def scores(values: Tensor, ids: Tensor) -> list[TokenScore]:
        return [TokenScore(token=tok.decode([i]) if tok is not None else str(i), id=i, score=float(v))
                for v, i in zip(values.tolist(), ids.tolist())]

    k = min(top, logits.shape[0])
    hi, lo = logits.topk(k), (-logits).topk(k)
    return scores(hi.values, hi.indices), scores(-lo.values, lo.indices)


def _examples(model: Any, texts: Sequence[str], acts: list[Tensor], top: int, context: int) -> list[FeatureExample]:
    """The `top` strongest positive activations over all texts, each with `context` tokens before it."""
    tok = _tokenizer(model)
    flat = [(float(v), t, p) for t, a in enumerate(acts) for p, v in enumerate(a.tolist()) if v > 0]
    flat.sort(key=lambda e: -e[0])
    examples = []
    for value, t, p in flat[:top]:
        ids = tok(texts[t], truncation=True)["input_ids"]
        lo, hi = max(0, p - context), min(len(ids), p + 1 + context // 2)
        examples.append(FeatureExample(text=t, position=p, activation=value,
                                       tokens=[tok.decode([i]) for i in ids[lo:hi]], marked=p - lo))
    return examples


def inspect_feature(model: Any, dictionary: Dictionary, texts: Sequence[str], feature: int, *, top: int = 10,
                    context: int = 8, batch_size: int = 8, progress: bool = True) -> FeatureReport:
    """Top-activating contexts of a feature over `texts` (the activating token marked) and its logit lens."""
    if not 0 <= feature < dictionary.d_dict:
        raise FeatureIndexError(feature, dictionary.d_dict)
    check_report_sizes(top, context)
    if not texts:
        raise InvalidArgumentError("texts", list(texts), "give at least one text to look for the feature in")
    acts = [f[:, feature] for f in features_of(model, dictionary, texts, batch_size=batch_size, progress=progress)]
    n = sum(a.numel() for a in acts)
    firing = sum(int((a > 0).sum()) for a in acts)
    promoted, suppressed = logit_lens(model, dictionary.W_dec[feature].detach(), top=top)
    card = getattr(dictionary, "card", None)
    from dictionaries.neuronpedia import neuronpedia_url

    return FeatureReport(dictionary=card.name if card is not None else type(dictionary).__name__,
                         feature=feature, tokens=n, frequency=firing / n if n else 0.0,
                         examples=_examples(model, texts, acts, top, context), promoted=promoted,
                         suppressed=suppressed, no_lens=lens_problem(model, dictionary.d_in),
                         neuronpedia=neuronpedia_url(card, feature))


def check_report_sizes(top: int, context: int) -> None:
    """`top` (contexts and logit-lens tokens shown) is at least 1 and `context` (tokens before) at least 0."""
    if top < 1:
        raise InvalidArgumentError("top", top, "show at least 1 context and token (default 10)")
    if context < 0:
        raise InvalidArgumentError("context", context, "show 0 or more tokens before the activating one (default 8)")


def read_texts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one text each; a file with none is an error."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(str(p), "Pass a text file with one text per line.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(str(p), f"not UTF-8 text (byte {e.start}: {e.reason}); save the texts as UTF-8") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise InvalidArgumentError("texts", str(p), "the file holds no text: write one text per line")
    return texts


def inspect_named(ref: str, feature: int, texts_file: str | Path, *, model: str | None = None,
                  top: int = 10, context: int = 8, hook: Any = None, model_dtype: Any = None,
                  device_map: Any = None) -> FeatureReport:
    """`dictctl inspect`: load the dictionary and the model (default: the card's model id), read the texts.
    `hook` (a module path or (site, layer), see hook_choice.py) replaces or supplies the card's hook point;
    the model loads in `model_dtype` (fp32 by default), placed by `device_map` (placement.py)."""
    from dictionaries.hook_choice import model_hook

    check_report_sizes(top, context)  # every cheap check before torch, the dictionary and the model load
    texts = read_texts(texts_file)
    from dictionaries.loader import load_dictionary
    from dictionaries.placement import model_dtype as as_dtype
    from dictionaries.placement import parse_device_map

    as_dtype(model_dtype), parse_device_map(device_map)

    dictionary = load_dictionary(ref)
    if not 0 <= feature < dictionary.d_dict:
        raise FeatureIndexError(feature, dictionary.d_dict)
    card = dictionary.card
    model_id = model or (card.model.id if card is not None and card.model is not None else None)
    if model_id is None:
        raise CardError(str(ref), "model", "the card names no model; pass `--model` (HF id or folder)")
    from dictionaries.attachment import wrap_model  # nnsight, only once everything else is known to be good

    wrapped = wrap_model(model_id, dtype=model_dtype, device_map=device_map)
    dictionary.card = card.model_copy(update={"hook": model_hook(wrapped, card, hook)})
    return inspect_feature(wrapped, dictionary, texts, feature, top=top, context=context)
