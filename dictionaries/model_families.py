"""Model families: where each residual-stream site of layer L is, as a module path and input or output.

One table for the transformers architectures the package knows, keyed by family (its `config.model_type`),
so that a (site, layer) pair becomes a module path of a loaded model (`site_hook`) and other libraries'
hook names (`hookpoints.py`) land on the same modules. Pure strings: nothing here imports torch.

Sites (TransformerLens' names, whose `blocks.L.hook_<site>` they are, except mlp_in):
- resid_pre   the residual stream entering block L (resid_pre of layer 0 is the embedding output, after
              any embedding scale or projection: the input of block 0);
- resid_mid   the residual stream between attention and MLP of a sequential block;
- resid_post  the residual stream leaving block L;
- mlp_in      what the MLP reads: its input, after the pre-MLP norm (what transcoders read; TransformerLens'
              `hook_mlp_in` is resid_mid instead, and `ln2.hook_normalized` is this);
- mlp_out     what the MLP adds to the residual stream; attn_out what the attention adds;
- attn_z      the attention's heads concatenated, before its output projection (`attn.hook_z`, flattened);
- mlp_post    the MLP's hidden activation, before its down projection (`mlp.hook_post`).

Paths are relative to the block `<layers>.L` (`""` is the block itself); `site_hook` puts the base model's
attribute (`base_model_prefix`: `model`, `transformer`, `bert`...) in front when the model is a head model
(`LlamaForCausalLM.model`), and nothing when it is the bare base model (`BertModel`). Where no module has
that tensor as its input or output, the site is absent from a family's `sites` and `unreadable` says why;
`site_hook` raises HookPointError with that reason. Dropout between a module and the residual add is the
identity in eval mode, so a module's output is what is added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_in", "mlp_out", "attn_out", "attn_z", "mlp_post")
CARD_SITE = {"resid_pre": "resid", "resid_mid": "resid", "resid_post": "resid", "mlp_in": "mlp", "mlp_out": "mlp",
             "attn_out": "attn", "attn_z": "attn", "mlp_post": "mlp"}
"""A site's kind in a card's HookPoint.site (embed, attn, mlp or resid)."""

_PARALLEL = ("the block is parallel (attention and MLP both read the block's input and both outputs are added "
             "to it at once), so no residual stream exists between them; read resid_pre or resid_post instead")


@dataclass(frozen=True)
class Family:
    """One architecture's module layout."""

    name: str
    base: str                    # the base model's attribute in a head model (config's base_model_prefix)
    layers: str                  # the block list under the base model
    embed: str                   # the token embedding under the base model
    sites: dict[str, str]        # site -> "path:io" relative to block L
    unreadable: dict[str, str] = field(default_factory=dict)   # site -> why no module carries it
    causal: bool = True          # a decoder that `generate`s (False: encoder, masked-LM head)
    model_types: tuple[str, ...] = ()   # other config.model_type values with this layout

    def block(self, layer: int) -> str:
        return f"{self.layers}.{layer}"


_PRE_LN = {"resid_pre": ":input", "resid_post": ":output"}


def _llama_like(name: str, *, model_types: tuple[str, ...] = ()) -> Family:
    """Llama's layout, shared by Mistral, Qwen2, Qwen3, Gemma (1) and Phi-3: `model.layers.L` with `self_attn`,
    `mlp` and the pre-MLP norm `post_attention_layernorm` (so resid_mid is that norm's input)."""
    return Family(name, "model", "layers", "embed_tokens", {
        **_PRE_LN, "resid_mid": "post_attention_layernorm:input", "mlp_in": "mlp:input", "mlp_out": "mlp:output",
        "attn_out": "self_attn:output", "attn_z": "self_attn.o_proj:input", "mlp_post": "mlp.down_proj:input"},
        model_types=model_types)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("gpt2", "transformer", "h", "wte", {
        **_PRE_LN, "resid_mid": "ln_2:input", "mlp_in": "mlp:input", "mlp_out": "mlp:output",
        "attn_out": "attn:output", "attn_z": "attn.c_proj:input", "mlp_post": "mlp.c_proj:input"}),
    # Pythia: use_parallel_residual=True, x + attn(ln1(x)) + mlp(ln2(x)) (modeling_gpt_neox.GPTNeoXLayer);
    # with it False the MLP reads post_attention_layernorm(x + attn), so resid_mid is that norm's input.
    Family("gpt_neox", "gpt_neox", "layers", "embed_in", {
        **_PRE_LN, "resid_mid": "post_attention_layernorm:input", "mlp_in": "mlp:input", "mlp_out": "mlp:output",
        "attn_out": "attention:output", "attn_z": "attention.dense:input", "mlp_post": "mlp.dense_4h_to_h:input"}),
    # GPT-J is always parallel: x + attn(ln_1(x)) + mlp(ln_1(x)) (modeling_gptj.GPTJBlock).
    Family("gptj", "transformer", "h", "wte", {
        **_PRE_LN, "mlp_in": "mlp:input", "mlp_out": "mlp:output", "attn_out": "attn:output",
        "attn_z": "attn.out_proj:input", "mlp_post": "mlp.fc_out:input"}, unreadable={"resid_mid": _PARALLEL}),
    _llama_like("llama"), _llama_like("mistral"), _llama_like("qwen2"), _llama_like("qwen3"),
    _llama_like("gemma"), _llama_like("phi3"),
    # Gemma 2 and 3 norm each sublayer's output before the residual add (post_attention_layernorm,
    # post_feedforward_layernorm) and the MLP's input with pre_feedforward_layernorm; what is added is the
    # post-norm's output, as TransformerLens' hook_attn_out / hook_mlp_out (Gemma Scope's mlp SAEs) have it.
    *[Family(name, "model", "layers", "embed_tokens", {
        **_PRE_LN, "resid_mid": "pre_feedforward_layernorm:input", "mlp_in": "mlp:input",
        "mlp_out": "post_feedforward_layernorm:output", "attn_out": "post_attention_layernorm:output",
        "attn_z": "self_attn.o_proj:input", "mlp_post": "mlp.down_proj:input"}, model_types=types)
      for name, types in (("gemma2", ()), ("gemma3_text", ()))],
    # OPT's MLP has no module of its own: fc1, activation_fn, fc2 sit in the block, which flattens the
    # tokens to (batch * pos, d) before them (modeling_opt.OPTDecoderLayer); hooks.py views such an
    # activation as (batch, pos, d). resid_mid is the pre-MLP norm's input (OPT-350m's post-LN layout:
    # self_attn_layer_norm's output, see `_variant`).
    Family("opt", "model", "decoder.layers", "decoder.embed_tokens", {
        **_PRE_LN, "resid_mid": "final_layer_norm:input", "mlp_in": "fc1:input", "mlp_out": "fc2:output",
        "attn_out": "self_attn:output", "attn_z": "self_attn.out_proj:input", "mlp_post": "fc2:input"}),
    # Falcon (parallel_attn=True, or new_decoder_architecture): x + attn(ln(x)) + mlp(ln(x)), the block adding
    # attn into the MLP's output tensor in place (`mlp_output += attention_output`, modeling_falcon), so
    # readers copy what they keep. With parallel_attn False, resid_mid is post_attention_layernorm's input.
    Family("falcon", "transformer", "h", "word_embeddings", {
        **_PRE_LN, "mlp_in": "mlp:input", "mlp_out": "mlp:output", "attn_out": "self_attention:output",
        "attn_z": "self_attention.dense:input", "mlp_post": "mlp.dense_4h_to_h:input"},
        unreadable={"resid_mid": _PARALLEL}),
    # BERT and RoBERTa are post-LN: each sublayer's output goes through dropout and LayerNorm(sublayer +
    # residual) (BertSelfOutput, BertOutput), so attn_out / mlp_out are the dense projections' outputs
    # before the add & norm, and the stream itself is only seen after a LayerNorm (resid_mid is the
    # attention block's output, resid_post the layer's).
    *[Family(name, name, "encoder.layer", "embeddings.word_embeddings", {
        **_PRE_LN, "resid_mid": "attention:output", "mlp_in": "intermediate:input", "mlp_out": "output.dense:output",
        "attn_out": "attention.output.dense:output", "attn_z": "attention.output.dense:input",
        "mlp_post": "output.dense:input"}, causal=False) for name in ("bert", "roberta")],
]}

_BY_TYPE = {t: f for f in FAMILIES.values() for t in (f.name, *f.model_types)}


def family_of(model_type: str | None) -> Family | None:
    """The family of a `config.model_type`, None when the table lacks it."""
    return _BY_TYPE.get(model_type or "")


def guess_family(model: str | None) -> Family | None:
    """A family from a model's name as libraries write it (`EleutherAI/pythia-70m`, `gemma-2-2b`), for cards
    whose model is named but not loaded; None when the name says nothing known."""
    name = (model or "").lower().rsplit("/", 1)[-1]
    if any(other in name for other in ("distilbert", "albert", "deberta", "camembert", "modernbert")):
        return None   # other layouts whose names contain "bert"
    for needle, fam in (("pythia", "gpt_neox"), ("neox", "gpt_neox"), ("gpt2", "gpt2"), ("gpt-j", "gptj"),
                        ("gemma-3", "gemma3_text"), ("gemma3", "gemma3_text"), ("gemma-2", "gemma2"),
                        ("gemma2", "gemma2"), ("gemma", "gemma"), ("llama", "llama"), ("mistral", "mistral"),
                        ("qwen3", "qwen3"), ("qwen", "qwen2"), ("phi-3", "phi3"), ("opt-", "opt"),
                        ("falcon", "falcon"), ("roberta", "roberta"), ("bert", "bert")):
        if needle in name:
            return FAMILIES[fam]
    return None


def _variant(fam: Family, config: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(sites, unreadable) of a family for one config: the layouts a config flag switches."""
    sites, unreadable = dict(fam.sites), dict(fam.unreadable)
    get = (lambda key, default=None: getattr(config, key, default)) if config is not None else (lambda k, d=None: d)
    parallel = {"gpt_neox": get("use_parallel_residual", True),
                "falcon": get("parallel_attn", True) or get("new_decoder_architecture", False)}.get(fam.name)
    if parallel is True:
        sites.pop("resid_mid", None)
        unreadable["resid_mid"] = _PARALLEL
    elif parallel is False and fam.name == "falcon":
        unreadable.pop("resid_mid", None)
        sites["resid_mid"] = "post_attention_layernorm:input"
    if fam.name == "opt" and get("do_layer_norm_before", True) is False:  # OPT-350m: post-LN blocks
        sites["resid_mid"] = "self_attn_layer_norm:output"
    return sites, unreadable


@dataclass(frozen=True)
class SiteHook:
    """A site of one layer found in the table: its module path (from the model's root) and io."""

    module: str
    io: str
    site: str
    layer: int

    @property
    def card_fields(self) -> dict[str, Any]:
        """HookPoint fields for a card: a resid_pre of layer L > 0 is the resid output of block L - 1 read at
        block L's input, kept as site resid, layer L - 1 (and layer 0's as embed)."""
        if self.site == "resid_pre":
            return {"module": self.module, "io": self.io, "site": "resid" if self.layer else "embed",
                    "layer": self.layer - 1 if self.layer else None}
        return {"module": self.module, "io": self.io, "site": CARD_SITE[self.site], "layer": self.layer}


def site_path(fam: Family, site: str, layer: int, *, config: Any = None, base: str | None = None
              ) -> SiteHook | str:
    """The SiteHook of `site` at `layer`, or a sentence saying why the family has no module for it.

    `base` is the base model's attribute in front of the paths (default: the family's, as in a head model;
    "" for a bare base model)."""
    if site not in SITES:
        return f"unknown site {site!r}; sites are {', '.join(SITES)}"
    sites, unreadable = _variant(fam, config)
    if site not in sites:
        return unreadable.get(site, f"the {fam.name} table names no module for {site}")
    rel, _, io = sites[site].partition(":")
    prefix = fam.base if base is None else base
    path = ".".join(p for p in (prefix, fam.block(layer), rel) if p)
    return SiteHook(path, io or "output", site, layer)


def embed_path(fam: Family, base: str | None = None) -> str:
    """The token embedding's module path from the model's root."""
    prefix = fam.base if base is None else base
    return f"{prefix}.{fam.embed}" if prefix else fam.embed
