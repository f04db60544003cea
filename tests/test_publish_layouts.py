"""Publishing in SAELens' layout (--layout saelens | both): one commit to the local hub (real olah + real
huggingface_hub client) whose SAELens pair and card load back to the same outputs; the model card's front matter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dictionaries.errors import InvalidArgumentError
from dictionaries.formats import read_folder

from helpers import D_IN, make_folder

X = torch.randn(3, 5, D_IN, generator=torch.Generator().manual_seed(2))


def same_outputs(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a(X).features, b(X).features, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a(X).reconstruction, b(X).reconstruction, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gated", "batchtopk"])
def test_both_layouts_in_one_commit(arch, tmp_path, hub_env):
    from huggingface_hub import snapshot_download

    from dictionaries.hub import model_card_metadata
    from dictionaries.loader import load_dictionary
    from dictionaries.publish import publish

    _, original = make_folder(tmp_path / "native", arch)
    before = hub_env.head("org/both") if (hub_env.repo_path("org/both") / ".git").exists() else None
    result = publish(tmp_path / "native", "org/both", subfolder=f"l0-{arch}", layout="both", local_hub=hub_env)
    assert sorted(result.uploaded) == [f"l0-{arch}/{f}" for f in ("README.md", "card.json", "cfg.json",
                                                                   "sae_weights.safetensors", "weights.safetensors")]
    assert hub_env.head("org/both") not in (None, before)
    folder = snapshot_download("org/both", revision=result.location.revision, allow_patterns=[f"l0-{arch}/*"],
                               endpoint=hub_env.endpoint)  # huggingface_hub reads HF_ENDPOINT once, at import
    here = os.path.join(folder, f"l0-{arch}")
    same_outputs(read_folder(here, format="saelens"), original)     # the SAELens pair
    same_outputs(load_dictionary(f"hf://org/both/l0-{arch}@{result.location.revision}"), original)  # the native
    meta = model_card_metadata(open(os.path.join(here, "README.md")).read())
    assert meta["library_name"] == "saelens" and meta["base_model"] == "toy-org/tiny-neox"
    assert {"saelens", "dictionaries", "sparse-autoencoder"} <= set(meta["tags"])
    assert f'SAE.from_pretrained("org/both", "l0-{arch}")' in open(os.path.join(here, "README.md")).read()


def test_saelens_layout_registers_a_saelens_entry_that_loads(tmp_path, hub_env, registry):
    from dictionaries.loader import load_dictionary
    from dictionaries.publish import publish

    card, original = make_folder(tmp_path / "native", "jumprelu")
    result = publish(tmp_path / "native", "org/sl", subfolder="layer0", layout="saelens", register=True,
                     local_hub=hub_env)
    assert sorted(result.uploaded) == ["layer0/README.md", "layer0/card.json", "layer0/cfg.json",
                                       "layer0/sae_weights.safetensors"]
    assert result.card.files.format == "saelens"
    assert [i.path for i in result.card.files.items] == ["card.json", "cfg.json", "sae_weights.safetensors"]
    same_outputs(load_dictionary(card.name), original)   # through the registry: hashes checked on fetch
    again = publish(tmp_path / "native", "org/sl", subfolder="layer0", layout="saelens", local_hub=hub_env)
    assert again.location.revision != result.location.revision   # same weights: no --force needed


def test_saelens_layout_needs_a_subfolder_and_a_known_name(tmp_path, local_hub):
    from dictionaries.publish import publish

    make_folder(tmp_path / "native")
    with pytest.raises(InvalidArgumentError, match="needs a subfolder"):
        publish(tmp_path / "native", "org/x", layout="saelens", local_hub=local_hub)
    done = subprocess.run([sys.executable, "-m", "dictionaries.cli", "publish", str(tmp_path / "native"), "--repo",
                           "org/x", "--layout", "parquet", "--subfolder", "a", "--local-hub", str(local_hub.root)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "native, saelens, both" in done.stderr


def test_eval_density_goes_up_as_saelens_sparsity(tmp_path, local_hub):
    from safetensors.torch import load_file, save_file

    from dictionaries.publish import publish

    make_folder(tmp_path / "native", "topk")
    frequency = torch.linspace(0, 0.5, 16)
    save_file({"frequency": frequency}, tmp_path / "native" / "density.safetensors")
    result = publish(tmp_path / "native", "org/sp", subfolder="a", layout="saelens", dry_run=True,
                     local_hub=local_hub, staging_dir=tmp_path / "stage")
    assert "a/sparsity.safetensors" in result.uploaded and "a/density.safetensors" in result.uploaded
    sparsity = load_file(tmp_path / "stage" / "a" / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(frequency + 1e-10))   # SAELens' log feature sparsity
