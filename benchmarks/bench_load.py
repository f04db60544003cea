"""Loading a 32768 x 512 relu dictionary from a warm cache, against reading its safetensors file alone.

The entry is committed to a local Hub (olah), registered in a temporary registry, fetched once (download
and sha256), then loaded again and again: online at its pinned commit (no network: huggingface_hub finds
the snapshot), offline (HF_HUB_OFFLINE=1), and from the native folder directly. The reference is
`safetensors.torch.load_file` of the same cached file (target: load_dictionary within 1.5x of it).
Opening a safetensors file maps it lazily, so each is also timed with every weight read once (a sum).
SAELens' `SAE.load_from_disk` of the same weights runs where sae_lens imports; dictionary_learning where
it imports. Timings are medians over interleaved repeats, so a noisy shared machine hurts all alike.
Also the wall time of `dictctl list` (a fresh interpreter).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

D_IN, D_DICT = 512, 32768
REPEATS = 7
NAME = "bench/mlp0/32768"


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def median_times(candidates: dict[str, Callable[[], object]], repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds of each candidate, the candidates interleaved within each repeat."""
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for key, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def make_entry(tmp: Path):
    """A random relu dictionary written as a native folder, and a registry entry pointing at a local hub."""
    import torch
    import yaml

    from dictionaries.architectures import build_dictionary
    from dictionaries.card import Card, Files
    from dictionaries.formats import write_native

    card = Card(name=NAME, architecture="relu", d_in=D_IN, d_dict=D_DICT, files=Files(items=[]))
    d = build_dictionary(card)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    card = write_native(d, tmp / "native")
    (tmp / "reg" / "cards" / "bench" / "mlp0").mkdir(parents=True)
    (tmp / "reg" / "cards" / f"{NAME}.yaml").write_text(yaml.safe_dump(card.model_dump(mode="json", exclude_none=True)))
    return d, card


def register(tmp: Path, repo: str, sha: str) -> Path:
    import yaml

    index = {"version": 1, "entries": {NAME: {"card": f"{NAME}.yaml", "location": {
        "kind": "hub", "repo": repo, "revision": sha, "subfolder": "d"}}}}
    (tmp / "reg" / "registry.yaml").write_text(yaml.safe_dump(index))
    return tmp / "reg" / "registry.yaml"


def saelens_folder(d, tmp: Path) -> Path | None:
    """The same weights saved by SAELens (cfg.json + sae_weights.safetensors), None if it is not installed."""
    if importlib.util.find_spec("sae_lens") is None:
        return None
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_DICT))
    with torch.no_grad():
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, key).copy_(getattr(d, key))
    sae.save_model(tmp / "saelens")
    return tmp / "saelens"


def touch(tensors) -> float:
    """Read every element (a sum), so that lazily mapped files are really read."""
    return float(sum(float(t.detach().sum()) for t in tensors))


def dictctl_list_seconds(repeats: int = 3) -> float:
    """Median wall time of `dictctl list` in a fresh interpreter."""
    cmd = [sys.executable, "-c", "from dictionaries.cli import main; main()", "list"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(tmp: Path) -> dict[str, float]:
    """Every timing (seconds) of the table, keyed by candidate, plus the weights' size in MiB."""
    from safetensors.torch import load_file

    from dictionaries.loader import load_dictionary
    from dictionaries.localhub import LocalHub
    from dictionaries.registry import Registry

    d, _ = make_entry(tmp)
    hf = tmp / "hf"
    with LocalHub(tmp / "hub") as hub, environment(HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"),
                                                      HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE=None):
        sha = hub.commit("bench/load", {"d/card.json": tmp / "native" / "card.json",
                                        "d/weights.safetensors": tmp / "native" / "weights.safetensors"}, "bench")
        registry = Registry(register(tmp, "bench/load", sha))
        start = time.perf_counter()
        load_dictionary(NAME, registry=registry)
        t = {"cold": time.perf_counter() - start}
        t |= median_times({"online": lambda: load_dictionary(NAME, registry=registry)})
    weights = _cached_folder(hf, sha) / "weights.safetensors"
    sae_dir = saelens_folder(d, tmp)
    with environment(HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"), HF_HUB_OFFLINE="1",
                     HF_ENDPOINT="http://127.0.0.1:9"):
        candidates = {
            "safetensors": lambda: load_file(weights),
            "offline": lambda: load_dictionary(NAME, registry=registry),
            "folder": lambda: load_dictionary(tmp / "native"),
            "safetensors+read": lambda: touch(load_file(weights).values()),
            "offline+read": lambda: touch(load_dictionary(NAME, registry=registry).parameters()),
        }
        if sae_dir is not None:
            from sae_lens import SAE

            candidates["saelens"] = lambda: SAE.load_from_disk(sae_dir)
            candidates["saelens+read"] = lambda: touch(SAE.load_from_disk(sae_dir).parameters())
        t |= median_times(candidates)
    t["MiB"] = weights.stat().st_size / 2**20
    return t


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as name:
        t = measure(Path(name))
    base, read_base = t["safetensors"], t["safetensors+read"]

    def row(what: str, seconds: float | None, note: str = "", reference: float = base) -> dict:
        return {"benchmark": "load", "what": what, "dictionary": f"{D_DICT}x{D_IN} relu", "MiB": round(t["MiB"], 1),
                "seconds": seconds, "x safetensors": None if seconds is None else seconds / reference, "note": note}

    rows = [row("safetensors.torch.load_file (reference)", base, "the cached weights file alone (lazy mmap)"),
            row("load_dictionary, warm cache, online (pinned)", t["online"], "target <= 1.5x"),
            row("load_dictionary, warm cache, HF_HUB_OFFLINE=1", t["offline"], "target <= 1.5x"),
            row("load_dictionary(native folder)", t["folder"], "reads card.json too"),
            row("load_file + read every weight (reference)", read_base, "mapped pages really read", read_base),
            row("load_dictionary offline + read every weight", t["offline+read"], "target <= 1.5x", read_base),
            row("load_dictionary, cold (download + sha256)", t["cold"], "local olah hub, once")]
    if "saelens" in t:
        import sae_lens

        rows.append(row(f"SAELens {sae_lens.__version__} SAE.load_from_disk", t["saelens"], "same weights"))
        rows.append(row(f"SAELens {sae_lens.__version__} load_from_disk + read every weight", t["saelens+read"],
                        "vs the read reference", read_base))
    else:
        rows.append(row("SAELens SAE.load_from_disk", None, "sae_lens not importable here (pip install sae-lens)"))
    rows.append(row("dictionary_learning AutoEncoder.from_pretrained", None, _dictionary_learning_note()))
    rows.append({"benchmark": "load", "what": "dictctl list (fresh interpreter)", "seconds": dictctl_list_seconds(),
                 "note": "wall time, must not import torch"})
    return rows


def _cached_folder(hf: Path, sha: str) -> Path:
    return hf / "hub" / "models--bench--load" / "snapshots" / sha / "d"


def _dictionary_learning_note() -> str:
    if importlib.util.find_spec("dictionary_learning") is not None:
        return "installed, but its loader needs its own torch/nnsight pins: not timed"
    return ("not installed: dictionary-learning 0.1.0 pins nnsight<0.4 and pulls torch 2.14.1 with CUDA, "
            "which would replace this environment's torch 2.13 / nnsight 0.8")


if __name__ == "__main__":
    for r in run():
        print(r)
