"""Big models (issue 11, item 5): model dtype and device_map through the real loading path, and a bf16 model with
an fp32 dictionary in attach, harvest, training, evaluation, inspect and dashboards (activations cast at the
boundary). CPU bf16 is real bf16 arithmetic, so these run anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dictionaries.attachment import attach, wrap_model
from dictionaries.errors import InvalidArgumentError
from dictionaries.hooks import collect_activations, load_model
from dictionaries.placement import dtype_name, input_device, is_dispatched, model_dtype, parse_device_map

from helpers import batch, make_dictionary

ROOT = Path(__file__).resolve().parents[1]
HOOK = "gpt_neox.layers.1.mlp"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The toy GPT-NeoX and its tokenizer saved as a local model folder, in bf16 (as Pythia's checkpoints are
    saved in fp16: their config names that dtype)."""
    from training.toymodel import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("model") / "toy"
    build_model().to(torch.bfloat16).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_model_dtype_names():
    assert model_dtype(None) is torch.float32
    assert [model_dtype(v) for v in ("bf16", "BFloat16", "torch.float16", "half", torch.bfloat16)] == \
        [torch.bfloat16, torch.bfloat16, torch.float16, torch.float16, torch.bfloat16]
    assert dtype_name("bf16") == "bfloat16" and dtype_name(None) == "float32"
    for bad in ("int8", "fp8", torch.int32, 3):
        with pytest.raises(InvalidArgumentError, match="fp32, bf16 or fp16"):
            model_dtype(bad)


def test_parse_device_map():
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto" and parse_device_map("cpu") == "cpu"
    assert parse_device_map('{"gpt_neox": "cpu", "embed_out": "cpu"}') == {"gpt_neox": "cpu", "embed_out": "cpu"}
    with pytest.raises(InvalidArgumentError, match="JSON object"):
        parse_device_map('{"gpt_neox": ')
    with pytest.raises(InvalidArgumentError, match="device"):
        parse_device_map("autoo")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="no cuda device"):
            parse_device_map({"gpt_neox": 0})


def test_load_model_dtype_and_device_map(folder, tokenizer):
    """fp32 is the default whatever the config says (transformers 5 alone would load the config's dtype: bf16
    here); bf16 loads bf16; "cpu" and "auto" maps go through transformers + accelerate (which computes the
    "auto" map from the memory it sees) and give the same model (its logits) as a plain load."""
    plain, _ = load_model(str(folder))
    assert next(plain.parameters()).dtype is torch.float32 and not is_dispatched(plain)
    half, _ = load_model(str(folder), dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        ref = plain(ids, attention_mask=mask).logits
    for device_map in ("cpu", "auto"):
        placed, _ = load_model(str(folder), device_map=device_map)
        assert not is_dispatched(placed)  # one device: placed as it loads, no accelerate hooks between blocks
        assert input_device(placed) == torch.device("cpu")
        with torch.no_grad():
            assert torch.equal(placed(ids, attention_mask=mask).logits, ref)


def test_bf16_model_fp32_dictionary_attach(folder, tokenizer):
    """Read and splice on a bf16 model with an fp32 dictionary: features in the dictionary's dtype, the error
    term writes the output back exactly, without it the output moves; an ablation moves it by a bf16 delta."""
    model = wrap_model(str(folder), dtype="bf16")
    d = make_dictionary(64, 96, HOOK)
    ids, mask = batch(tokenizer)
    with model.trace({"input_ids": ids, "attention_mask": mask}):
        clean = model.output.logits.save()
    with attach(model, d) as sae:
        with model.trace({"input_ids": ids, "attention_mask": mask}):
            f = sae.features.save()
            x_hat = sae.reconstruction.save()
            sae.splice(error=True)
            same = model.output.logits.save()
        with model.trace({"input_ids": ids, "attention_mask": mask}):
            sae.splice(error=False)
            spliced = model.output.logits.save()
        with model.trace({"input_ids": ids, "attention_mask": mask}):
            sae.ablate(list(range(96)))
            ablated = model.output.logits.save()
    assert f.dtype is torch.float32 and x_hat.dtype is torch.bfloat16 and clean.dtype is torch.bfloat16
    assert int((f > 0).sum()) > 0
    assert torch.equal(same, clean)
    real = mask.bool()
    assert not torch.allclose(spliced[real], clean[real], atol=1e-2)
    assert not torch.allclose(ablated[real], clean[real], atol=1e-2)
    [x] = collect_activations(model, [HOOK], ids, mask)  # harvest stays in the model's dtype
    assert x.dtype is torch.bfloat16 and x.shape == (*ids.shape, 64)


def test_wrap_model_dtype_and_device_map_of_objects(tokenizer):
    from training.toymodel import build_model

    raw = build_model()
    wrapped = wrap_model(raw, tokenizer, dtype="fp16")
    assert next(raw.parameters()).dtype is torch.float16 and wrapped.tokenizer is tokenizer
    with pytest.raises(InvalidArgumentError, match="HF id or folder"):
        wrap_model(build_model(), tokenizer, device_map="auto")
