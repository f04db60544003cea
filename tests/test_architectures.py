"""Dictionary modules: one interface for every kind, any leading shape, each kind's rule, dtype/device, errors."""

from __future__ import annotations

import pytest
import torch

from dictionaries.architectures import ARCHITECTURES, DictionaryOutput, build_dictionary
from dictionaries.card import Card, Files
from dictionaries.errors import DtypeDeviceError, ShapeMismatchError

D, F, K = 6, 20, 3


def make(kind: str, *, seed: int = 0, pre_encoder_bias: bool = True, dtype=torch.float32):
    """A module of `kind` with random parameters (thresholds small and positive)."""
    torch.manual_seed(seed)
    extra = {"k": K} if kind in ("topk", "batchtopk") else {}
    module = ARCHITECTURES[kind](D, F, pre_encoder_bias=pre_encoder_bias, dtype=dtype, **extra)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
            if name == "threshold":
                p.abs_().mul_(0.3)
    return module


def pre_activation(m, x):
    return ((x - m.b_dec) if m.pre_encoder_bias else x) @ m.W_enc + m.b_enc


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 4)])
def test_any_leading_shape(kind, lead):
    m = make(kind)
    x = torch.randn(*lead, D)
    out = m(x)
    assert isinstance(out, DictionaryOutput)
    assert out.features.shape == (*lead, F)
    assert out.reconstruction.shape == (*lead, D)
    flat = m(x.reshape(-1, D))  # the same numbers token by token
    torch.testing.assert_close(out.features.reshape(-1, F), flat.features)
    torch.testing.assert_close(out.reconstruction, m.decode(m.encode(x)))
    torch.testing.assert_close(out.reconstruction, out.features @ m.W_dec + m.b_dec)
    assert (out.features >= 0).all()


@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_relu_with_and_without_pre_encoder_bias(pre_encoder_bias):
    m = make("relu", pre_encoder_bias=pre_encoder_bias)
    x = torch.randn(7, D)
    expected = torch.relu(((x - m.b_dec) if pre_encoder_bias else x) @ m.W_enc + m.b_enc)
    torch.testing.assert_close(m.encode(x), expected)
    other = make("relu", pre_encoder_bias=not pre_encoder_bias)
    assert not torch.allclose(other.encode(x), expected)  # the flag changes the rule


def test_topk_keeps_exactly_k_largest():
    m = make("topk")
    with torch.no_grad():
        m.b_enc.add_(5.0)  # every pre-activation positive, so exactly k survive the ReLU
    x = torch.randn(4, 9, D)
    f = m.encode(x)
    assert ((f > 0).sum(-1) == K).all()
    pre = pre_activation(m, x)
    kth = pre.topk(K, dim=-1).values[..., -1:]
    torch.testing.assert_close(f, torch.where(pre >= kth, pre, torch.zeros_like(pre)))


def test_topk_k_must_fit():
    with pytest.raises(ValueError, match="k must be in"):
        ARCHITECTURES["topk"](D, F, k=F + 1)


def test_batchtopk_encode_batch_keeps_k_times_tokens():
    m = make("batchtopk")
    with torch.no_grad():
        m.b_enc.add_(5.0)
    x = torch.randn(3, 5, D)
    f = m.encode_batch(x)
    assert int((f > 0).sum()) == K * 15
    pre = torch.relu(pre_activation(m, x))
    cut = pre.flatten().topk(K * 15).values[-1]
    torch.testing.assert_close(f, pre * (pre >= cut))


def test_batchtopk_encode_uses_global_threshold():
    m = make("batchtopk")
    x = torch.randn(50, D)
    pre = torch.relu(pre_activation(m, x))
    with torch.no_grad():
        m.threshold.fill_(float(pre.median()))
    f = m.encode(x)
    torch.testing.assert_close(f, pre * (pre > m.threshold))
    assert 0 < int((f > 0).sum()) < pre.numel()


def test_jumprelu_threshold_per_feature():
    m = make("jumprelu")
    x = torch.randn(40, D)
    pre = pre_activation(m, x)
    f = m.encode(x)
    active = (pre > m.threshold) & (pre > 0)
    torch.testing.assert_close(f, torch.where(active, pre, torch.zeros_like(pre)))
    assert ((pre > 0) & ~active).any()  # some positive pre-activations fall below their threshold
    with torch.no_grad():
        m.threshold.fill_(1e6)
    assert (m.encode(x) == 0).all()


def test_gated_gate_and_magnitude():
    m = make("gated")
    x = torch.randn(30, D)
    projected = (x - m.b_dec) @ m.W_enc
    gate = (projected + m.b_enc) > 0
    magnitude = torch.relu(projected * torch.exp(m.r_mag) + m.b_mag)
    torch.testing.assert_close(m.encode(x), gate * magnitude)
    assert (gate & (magnitude == 0)).any() or (~gate & (magnitude > 0)).any()  # the two paths differ


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_dtype_moves_and_mismatches(kind):
    m = make(kind)
    x = torch.randn(3, D)
    expected = m(x).reconstruction
    m64 = m.to(torch.float64)
    assert m64.W_enc.dtype == torch.float64
    torch.testing.assert_close(m64(x.double()).reconstruction.float(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DtypeDeviceError) as info:
        m64.encode(x)
    assert isinstance(info.value, TypeError)
    assert "float64" in str(info.value)
    assert "float32" in str(info.value)
    with pytest.raises(DtypeDeviceError):
        m64.decode(torch.zeros(3, F))


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_device_mismatch(kind):
    m = make(kind).to("meta")
    with pytest.raises(DtypeDeviceError, match="meta"):
        m.encode(torch.randn(2, D))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_cuda_move(kind):
    m = make(kind)
    x = torch.randn(4, D)
    expected = m(x)
    got = m.to("cuda")(x.to("cuda"))
    torch.testing.assert_close(got.reconstruction.cpu(), expected.reconstruction, rtol=1e-4, atol=1e-4)
    with pytest.raises(DtypeDeviceError):
        m.encode(x)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_shape_mismatch_names_both_shapes(kind):
    m = make(kind)
    with pytest.raises(ShapeMismatchError) as info:
        m.encode(torch.randn(2, D + 1))
    assert f"(..., {D})" in str(info.value)
    assert f"(2, {D + 1})" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ShapeMismatchError, match=f"\\(..., {F}\\)"):
        m.decode(torch.randn(2, F - 1))


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_build_from_card_and_state_round_trip(kind):
    k = K if kind in ("topk", "batchtopk") else None
    card = Card(name=f"test/{kind}", architecture=kind, d_in=D, d_dict=F, k=k, pre_encoder_bias=False,
                files=Files(items=[]))
    built = build_dictionary(card)
    assert built.card is card
    assert built.architecture == kind
    assert not built.pre_encoder_bias
    assert all((p == 0).all() for p in built.parameters())
    source = make(kind, pre_encoder_bias=False)
    built.load_native_state(source.native_state())
    x = torch.randn(5, D)
    torch.testing.assert_close(built(x).reconstruction, source(x).reconstruction)
    assert f"name='test/{kind}'" in repr(built)


def test_load_native_state_rejects_wrong_keys_and_shapes():
    m = make("jumprelu")
    state = m.native_state()
    with pytest.raises(ShapeMismatchError, match="'W_dec'") as info:
        m.load_native_state({**state, "W_dec": torch.zeros(F, D + 2)}, source="w.safetensors")
    assert info.value.expected == (F, D)
    assert info.value.found == (F, D + 2)
    from dictionaries.errors import FormatError

    with pytest.raises(FormatError, match="missing \\['threshold'\\]"):
        m.load_native_state({k: v for k, v in state.items() if k != "threshold"})


@pytest.mark.parametrize("kind", sorted(k for k, cls in ARCHITECTURES.items() if cls.columnwise))
@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_encode_columns_is_encode_of_those_columns(kind, pre_encoder_bias):
    """Each columnwise kind's block rule (sparse_decoding.encode_code encodes by it) is its `encode` restricted."""
    m = make(kind, pre_encoder_bias=pre_encoder_bias)
    x = torch.randn(9, D)
    xc = x - m.b_dec if pre_encoder_bias else x
    full = m.encode(x)
    assert 0 < int(torch.count_nonzero(full)) < full.numel()
    for cols in (slice(0, 7), slice(7, 14), slice(14, F)):
        torch.testing.assert_close(m.encode_columns(xc, cols), full[:, cols])
    assert not ARCHITECTURES["topk"].columnwise and ARCHITECTURES["batchtopk"].columnwise
