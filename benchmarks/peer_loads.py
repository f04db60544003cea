"""The peer side of the writers benchmark (bench_writers.py): folders written by this package loaded by the peer's
own loader, and its features and reconstructions of given inputs.

Run in the peer's virtual environment (benchmarks/peers.py) as `python benchmarks/peer_loads.py JOB_FOLDER`:
`job.json` = {"peer", "items": [{"name", "path" | "repo" + "sae_id"}]} and `x.safetensors` (`x`, (n, d)).
(`saelens_converter`: SAELens' loaders of foreign releases, for bench_readers.py.) For each item it writes
`<name>.safetensors` (`features` (n, F) dense, `reconstruction` (n, d)) or
`<name>.error` (one line). Loaders, as each library documents them:
- SAELens 6: `SAE.load_from_disk(path)`, `SAE.from_pretrained(repo_id, sae_id)` (a repo id that is no release
  of its directory is read as a Hub repo, the sae_id its folder; HF_ENDPOINT is honoured); `encode`, `decode`.
- sparsify 1.3: `SparseCoder.load_from_disk(path)`; `encode` -> top_acts, top_indices; `decode(top_acts,
  top_indices)`.
- dictionary_learning 0.1.0: `utils.load_dictionary`'s dispatch on config.json's dict_class to the class's
  `from_pretrained`; `encode`, `decode` (their defaults).
Module level imports torch and safetensors only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def saelens(item: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from sae_lens import SAE

    if "repo" not in item:
        sae = SAE.load_from_disk(item["path"], device="cpu")
    else:
        sae = SAE.from_pretrained(item["repo"], item["sae_id"], device="cpu")
    f = sae.encode(x)
    return f, sae.decode(f)


def sparsify(item: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(item["path"], device="cpu")
    out = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents, dtype=x.dtype).scatter_(-1, out.top_indices, out.top_acts)
    return dense, coder.decode(out.top_acts, out.top_indices)


def dictionary_learning(item: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # utils.load_dictionary's own dispatch (config.json's trainer.dict_class -> Class.from_pretrained(ae.pt[, k]));
    # utils.py itself is not imported: it imports `datasets`, which this venv leaves out (benchmarks/peers.py)
    from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    trainer = json.loads((Path(item["path"]) / "config.json").read_text())["trainer"]
    cls = {c.__name__: c for c in (AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder,
                                   AutoEncoderTopK, BatchTopKSAE)}[trainer["dict_class"]]
    k = {"k": trainer["k"]} if cls in (AutoEncoderTopK, BatchTopKSAE) else {}
    ae = cls.from_pretrained(str(Path(item["path"]) / "ae.pt"), device="cpu", **k)
    f = ae.encode(x)
    return f, ae.decode(f)


def saelens_converter(item: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' own converter of a foreign release (`converter`: gemma_2, goodfire, llama_scope) through
    `SAE.from_pretrained(repo, folder, converter=...)`. The converters write each release's sizes as constants
    (Gemma 2 2B's d_in 2304, the folder's width): they are set from the tensors so that tiny copies load. The
    release's norm_scaling_factor, which from_pretrained looks up in its directory by release name, is folded
    after loading as it would be (`item["norm_scaling_factor"]`, sqrt(d) / the dataset's average norm)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS

    real = NAMED_PRETRAINED_SAE_LOADERS[item["converter"]]

    def sized(**kw):
        cfg, state, sparsity = real(**kw)
        cfg["d_in"], cfg["d_sae"] = state["W_enc"].shape
        return cfg, state, sparsity

    sae = SAE.from_pretrained(item["repo"], item["sae_id"], device="cpu", converter=sized)
    if item.get("norm_scaling_factor"):
        sae.fold_activation_norm_scaling_factor(item["norm_scaling_factor"])
    f = sae.encode(x)
    return f, sae.decode(f)


LOADERS = {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictionary_learning,
           "saelens_converter": saelens_converter}


def main(folder: Path) -> None:
    job = json.loads((folder / "job.json").read_text())
    x = load_file(folder / "x.safetensors")["x"]
    for item in job["items"]:
        try:
            with torch.no_grad():
                f, x_hat = LOADERS[job["peer"]](item, x)
            result = {"features": f.detach().float().contiguous(),
                      "reconstruction": x_hat.detach().float().contiguous()}
            save_file(result, folder / f"{item['name']}.safetensors")
        except Exception as e:  # one failing load must not hide the others
            (folder / f"{item['name']}.error").write_text(f"{type(e).__name__}: {e}".splitlines()[0][:300])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
