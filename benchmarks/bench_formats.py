"""Reading foreign folders: `read_folder` against reading the same weight file alone, per format.

A 32768 x 512 dictionary (random weights) is written as each format writes it: native
(weights.safetensors + card.json), dictionary_learning (`torch.save` of an AutoEncoder state dict +
config.json), SAELens 6 (sae_weights.safetensors + cfg.json) and sparsify (sae.safetensors + cfg.json).
For each, the median over interleaved repeats of: the file alone (`torch.load(weights_only=True)` or
`safetensors.torch.load_file`), `read_folder` with a registry-style card given (no hashing), `read_folder`
building its own card (every file hashed, as for an unregistered folder), and `convert` to a native folder.
Every candidate reads each weight once (a sum), since files are mapped lazily.

`python -m benchmarks.bench_formats`
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

D_IN, D_DICT, K = 512, 32768, 32
REPEATS = 5


def write_folders(tmp: Path) -> dict[str, tuple[Path, Callable[[], object]]]:
    """format -> (folder, a function reading its weight file alone)."""
    import torch
    from safetensors.torch import load_file, save_file

    from dictionaries.architectures import ARCHITECTURES
    from dictionaries.formats import write_native

    g = torch.Generator().manual_seed(0)
    w_enc, w_dec = torch.randn(D_IN, D_DICT, generator=g) * 0.02, torch.randn(D_DICT, D_IN, generator=g) * 0.02
    b_enc, b_dec = torch.randn(D_DICT, generator=g) * 0.02, torch.randn(D_IN, generator=g) * 0.02
    native = ARCHITECTURES["relu"](D_IN, D_DICT)
    native.load_native_state({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec})
    write_native(native, tmp / "native")

    dl = tmp / "dictionary_learning"
    dl.mkdir()
    dec = w_dec.T.contiguous()
    torch.save({"bias": b_dec, "encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc,
                "decoder.weight": dec / dec.norm(dim=0)}, dl / "ae.pt")
    (dl / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D_IN,
                                                            "dict_size": D_DICT}}))
    sl = tmp / "saelens"
    sl.mkdir()
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(sl / "sae_weights.safetensors"))
    (sl / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_DICT, "dtype": "float32",
                                             "apply_b_dec_to_input": True, "normalize_activations": "none",
                                             "architecture": "standard", "metadata": {"sae_lens_version": "6.0.0"}}))
    sp = tmp / "sparsify"
    sp.mkdir()
    save_file({"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec},
              str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_DICT, "k": K, "d_in": D_IN}))
    return {"native": (tmp / "native", lambda: load_file(tmp / "native" / "weights.safetensors")),
            "dictionary_learning": (dl, lambda: torch.load(dl / "ae.pt", weights_only=True)),
            "saelens": (sl, lambda: load_file(sl / "sae_weights.safetensors")),
            "sparsify": (sp, lambda: load_file(sp / "sae.safetensors"))}


def touch(tensors) -> float:
    """Read every element once (a sum)."""
    return float(sum(float(t.detach().float().sum()) for t in tensors))


def run() -> list[dict]:
    from dictionaries.formats import convert, read_folder

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for fmt, (folder, alone) in write_folders(tmp).items():
            card = read_folder(folder).card  # what a registry entry would hand over
            n = iter(range(10 ** 6))
            candidates = {
                "file alone": lambda: touch(alone().values()),
                "read_folder (card given)": lambda: touch(read_folder(folder, card=card).parameters()),
                "read_folder (card built, files hashed)": lambda: touch(read_folder(folder).parameters()),
                "convert to native": lambda: convert(folder, tmp / f"out{next(n)}"),
            }
            times: dict[str, list[float]] = {k: [] for k in candidates}
            for _ in range(REPEATS):
                for key, fn in candidates.items():
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
            base = statistics.median(times["file alone"])
            for key, values in times.items():
                t = statistics.median(values)
                rows.append({"benchmark": "formats", "format": fmt, "what": key, "ms": round(1000 * t, 1),
                             "x file alone": round(t / base, 2)})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
