"""The dictionary modules: one interface (`encode`, `decode`, `forward`) for every architecture.

Native parameter names and shapes (DESIGN.md section 5), d = d_in, F = d_dict:
`W_enc [d, F]`, `b_enc [F]`, `W_dec [F, d]`, `b_dec [d]`, plus `threshold [F]` (jumprelu),
`threshold []` (batchtopk's global inference threshold) and `r_mag [F]`, `b_mag [F]` (gated).
Every module takes any leading shape `(..., d)` and returns features `(..., F)`.

Transcoders (Dunefsky, Chlenski & Nanda 2024, arXiv:2406.11944) read one hook point and predict another of
width d_out (the card's `output_hook`, `d_out`): then `W_dec [F, d_out]`, `b_dec [d_out]`, no pre-encoder
bias (b_dec lives in the output space, as in SAELens' Transcoder and sparsify's `transcode`), and every
architecture's encoder is unchanged. Skip-transcoders (Paulo, Shabalin & Belrose 2025, arXiv:2501.18823) add
`W_skip [d_in, d_out]`: prediction = decode(f) + x @ W_skip (SAELens and sparsify store its transpose).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from dictionaries.errors import DtypeDeviceError, FormatError, ShapeMismatchError
from dictionaries.sparse_decoding import decode_dense

if TYPE_CHECKING:
    from dictionaries.card import Card


SPARSE_DECODE_DENSITY = 1 / 16
"""Below this fraction of non-zero features (TopK at k / F, a trained ReLU at L0 / F: under 1%), `decode` sums the
active decoder rows (B * L0 * d work) instead of the dense (B, F) @ (F, d) matmul; without a gradient to f only,
as the zeros of f get none that way."""


def _mostly_zero(f: Tensor) -> bool:
    return f.numel() > 0 and int(torch.count_nonzero(f)) <= SPARSE_DECODE_DENSITY * f.numel()


class DictionaryOutput(NamedTuple):
    """What `forward` returns."""

    reconstruction: Tensor
    """x_hat, (..., d_in)."""
    features: Tensor
    """f, (..., d_dict)."""


class Dictionary(nn.Module):
    """Base of every dictionary: affine encoder, an architecture-specific nonlinearity, affine decoder."""

    architecture: ClassVar[str]
    columnwise: ClassVar[bool] = True  # each feature from its own pre-activation: `encode_columns` applies
    extra_parameters: ClassVar[dict[str, str]] = {}  # name -> "F" or "" (scalar), beyond the four shared

    def __init__(self, d_in: int, d_dict: int, *, pre_encoder_bias: bool = True, card: Card | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 d_out: int | None = None, skip: bool = False):
        super().__init__()
        self.d_in, self.d_dict = d_in, d_dict
        self.d_out = d_out or d_in    # the decoder's width: d_in for an SAE, the output hook's for a transcoder
        self.pre_encoder_bias = pre_encoder_bias
        self.card = card
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_dict, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_dict, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_dict, self.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out, **kw)) if skip else None
        for name, dim in self.extra_parameters.items():
            shape = (d_dict,) if dim == "F" else ()
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, **kw)))

    # ---- the interface -------------------------------------------------------------------------
    def pre_activation(self, x: Tensor) -> Tensor:
        """W_enc^T (x - b_dec) + b_enc, (..., F); the b_dec subtraction only with a pre-encoder bias."""
        self._check_input(x)
        if self.pre_encoder_bias:
            x = x - self.b_dec
        # addmm fuses the bias into the GEMM: one pass over the (tokens, F) output instead of two
        return torch.addmm(self.b_enc, x.reshape(-1, self.d_in), self.W_enc).view(*x.shape[:-1], self.d_dict)

    def encode(self, x: Tensor) -> Tensor:
        """Features f (..., F) of activations x (..., d)."""
        raise NotImplementedError

    def encode_columns(self, xc: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        """encode(x)[:, cols] (tokens, len(cols)) from the centred activations xc = x - b_dec (x without a
        pre-encoder bias), (tokens, d), reading only those columns of W_enc: what lets a sparse encode work
        in cache-sized blocks of features (sparse_decoding.encode_code). Only where `columnwise`. `out`, a
        contiguous (tokens, len(cols)) buffer, may receive the pre-activations (a block reused, not allocated)."""
        raise NotImplementedError

    def _pre_columns(self, xc: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        """pre_activation's columns `cols`: addmm of the bias slice, (tokens, len(cols)), into `out` if given."""
        if out is None:
            return torch.addmm(self.b_enc[cols], xc, self.W_enc[:, cols])
        return torch.addmm(self.b_enc[cols], xc, self.W_enc[:, cols], out=out)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction x_hat (..., d) of features f (..., F)."""
        if f.shape[-1] != self.d_dict:
            raise ShapeMismatchError("features", f"(..., {self.d_dict})", tuple(f.shape))
        self._check_dtype_device(f)
        if not (f.requires_grad and torch.is_grad_enabled()) and _mostly_zero(f):
            return decode_dense(self.W_dec, self.b_dec, f)  # through the active rows only (sparse_decoding.py)
        return f @ self.W_dec + self.b_dec

    def predict(self, x: Tensor, f: Tensor) -> Tensor:
        """decode(f) plus, for a skip-transcoder, the skip term x @ W_skip: (..., d_out)."""
        out = self.decode(f)
        return out if self.W_skip is None else out + x @ self.W_skip

    def forward(self, x: Tensor) -> DictionaryOutput:
        """Reconstruction (a transcoder: prediction of the output hook) and features of x."""
        f = self.encode(x)
        return DictionaryOutput(self.predict(x, f), f)

    # ---- state ---------------------------------------------------------------------------------
    def load_native_state(self, state: dict[str, Tensor], source: str = "state") -> Dictionary:
        """Copy native-named tensors in, checking that keys and shapes are exactly the expected ones."""
        expected = {k: tuple(v.shape) for k, v in self.named_parameters()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise FormatError(source, f"{self.architecture} dictionary expects tensors {sorted(expected)}; "
                                      f"missing {missing}, unexpected {unexpected}")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ShapeMismatchError(f"{source}: tensor {key!r}", shape, tuple(state[key].shape))
        with torch.no_grad():
            for key, p in self.named_parameters():
                p.copy_(state[key].to(p.dtype))
        return self

    def native_state(self) -> dict[str, Tensor]:
        """Tensors under their native names (contiguous, detached), ready for safetensors."""
        return {k: v.detach().contiguous() for k, v in self.named_parameters()}

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ShapeMismatchError("activations", f"(..., {self.d_in})", tuple(x.shape),
                                     hint="Is the dictionary attached to the right hook point?")
        self._check_dtype_device(x)

    def _check_dtype_device(self, t: Tensor) -> None:
        w = self.W_enc
        if t.dtype != w.dtype or t.device != w.device:
            raise DtypeDeviceError(f"{w.dtype} on {w.device}", f"{t.dtype} on {t.device}")

    def extra_repr(self) -> str:
        name = f", name={self.card.name!r}" if self.card is not None else ""
        out = f", d_out={self.d_out}" if self.d_out != self.d_in else ""
        skip = ", skip=True" if self.W_skip is not None else ""
        return f"d_in={self.d_in}, d_dict={self.d_dict}{out}{skip}{name}"


class ReluDictionary(Dictionary):
    """f = ReLU(W_enc^T (x - b_dec) + b_enc) (Bricken et al. 2023); without the b_dec subtraction when asked."""

    architecture = "relu"

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_activation(x).relu_()  # in place on the fresh pre-activation: no second (tokens, F) tensor

    def encode_columns(self, xc: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        return self._pre_columns(xc, cols, out).relu_()


class TopKDictionary(Dictionary):
    """Keep the k largest pre-activations per token, ReLU'd (Gao et al. 2024)."""

    architecture = "topk"
    columnwise = False  # a token's k largest over all F: no column block alone decides

    def __init__(self, d_in: int, d_dict: int, *, k: int, **kw):
        super().__init__(d_in, d_dict, **kw)
        if not 0 < k <= d_dict:
            raise ValueError(f"k must be in 1..d_dict={d_dict}, got {k}")
        self.k = k

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activation(x)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class BatchTopKDictionary(TopKDictionary):
    """BatchTopK (Bussmann et al. 2024): top k*batch over a batch in training, a global threshold at inference.

    `threshold` (a scalar) is the inference threshold; `encode` uses it, `encode_batch` the batch rule.
    """

    architecture = "batchtopk"
    columnwise = True  # at inference a global threshold: each feature on its own
    extra_parameters = {"threshold": ""}

    def encode(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.pre_activation(x))
        return pre * (pre > self.threshold)

    def encode_columns(self, xc: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        pre = self._pre_columns(xc, cols, out).relu_()
        return pre * (pre > self.threshold)

    def encode_batch(self, x: Tensor) -> Tensor:
        """The training rule: keep the k * tokens largest activations over all tokens of x (tokens, d)."""
        pre = torch.relu(self.pre_activation(x))
        flat = pre.flatten()
        n_keep = min(self.k * pre[..., 0].numel(), flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)


class JumpReluDictionary(Dictionary):
    """f = pre * (pre > threshold) per feature (Rajamanoharan et al. 2024b, JumpReLU)."""

    architecture = "jumprelu"
    extra_parameters = {"threshold": "F"}

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activation(x)
        return pre * (pre > self.threshold) * (pre > 0)

    def encode_columns(self, xc: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        pre = self._pre_columns(xc, cols, out)
        return pre * (pre > self.threshold[cols]) * (pre > 0)


class GatedDictionary(Dictionary):
    """Gated SAE with tied gate/magnitude weights (Rajamanoharan et al. 2024a).

    gate = (W_enc^T x' + b_enc > 0); magnitude = ReLU((W_enc * exp(r_mag))^T x' + b_mag); f = gate * magnitude.
    """

    architecture = "gated"
    extra_parameters = {"r_mag": "F", "b_mag": "F"}

    def encode(self, x: Tensor) -> Tensor:
        self._check_input(x)
        xc = x - self.b_dec if self.pre_encoder_bias else x
        projected = xc @ self.W_enc                                   # (..., F)
        gate = (projected + self.b_enc) > 0
        magnitude = torch.relu(projected * torch.exp(self.r_mag) + self.b_mag)
        return gate * magnitude

    def encode_columns(self, xc: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        projected = torch.mm(xc, self.W_enc[:, cols], out=out)                          # (tokens, len(cols))
        gate = (projected + self.b_enc[cols]) > 0
        return gate * torch.relu(projected * torch.exp(self.r_mag[cols]) + self.b_mag[cols])


ARCHITECTURES: dict[str, type[Dictionary]] = {
    cls.architecture: cls
    for cls in (ReluDictionary, TopKDictionary, BatchTopKDictionary, JumpReluDictionary, GatedDictionary)
}


def build_dictionary(card: Card, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Dictionary:
    """An empty (zero) module of the card's architecture and sizes, with the card attached."""
    cls = ARCHITECTURES[card.architecture]
    kw = {"pre_encoder_bias": card.pre_encoder_bias, "card": card,
          "dtype": dtype or getattr(torch, card.dtype), "device": device}
    if card.k is not None:
        kw["k"] = card.k
    kw.update(d_out=card.d_out, skip=card.skip)
    return cls(card.d_in, card.d_dict, **kw)
