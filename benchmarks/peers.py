"""The peers' own virtual environments: one per peer (dictionary_learning, SAELens, sparsify, SAEDashboard),
built on demand.

The peers cannot share this package's environment: dictionary_learning 0.1.0 pins nnsight < 0.4 (this package
needs >= 0.4), SAELens pulls transformer_lens and its own stack, and EleutherAI's sparsify (`eai-sparsify` on
PyPI; the PyPI name `sparsify` is Neural Magic's unrelated, deprecated tool) pulls accelerate and schedulefree.
Each venv lives under `~/.cache/dictionaries-bench/venvs/<peer>` (`DICTIONARIES_BENCH_VENVS` moves the folder)
and gets torch==2.13.0 first (a local CPU wheel where pip is set up with one; a bare `torch` requirement would
pull gigabytes of CUDA packages), then the peer with torch held at that version by a constraints file. A peer
whose metadata asks for more than it imports for training is installed with `--no-deps` and the explicit list
below. A venv whose recorded install spec differs from the current one is rebuilt; a failed build leaves a
one-line reason that the benchmark rows show instead of results.

`python -m benchmarks.peers build [peer ...]` builds (or checks) the venvs; `python -m benchmarks.peers status`.
`DL_PYTHON`, `SAELENS_PYTHON`, `SPARSIFY_PYTHON`, `SAEDASHBOARD_PYTHON` name an existing interpreter instead
(as bench_train and bench_dashboard read them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

TORCH = "torch==2.13.0"
VENVS_ENV = "DICTIONARIES_BENCH_VENVS"
NO_INSTALL_ENV = "DICTIONARIES_BENCH_NO_INSTALL"  # set to 1: never build, rows say how to
SPEC_FILE, FAILED_FILE = "dictionaries-bench-spec.json", "dictionaries-bench-failed.txt"


@dataclass(frozen=True)
class Peer:
    """How one peer is installed and imported."""

    name: str
    requirement: str                  # the peer's distribution, pinned
    module: str                       # what peer_steps.py imports
    python_env: str                   # an environment variable naming a ready interpreter instead
    no_deps: bool = False             # install the peer itself with --no-deps ...
    extra: tuple[str, ...] = field(default_factory=tuple)    # ... and these, with their dependencies ...
    bare: tuple[str, ...] = field(default_factory=tuple)     # ... and these without theirs
    remove: tuple[str, ...] = field(default_factory=tuple)   # uninstalled last (pulled in, unused, breaking)


PEERS: dict[str, Peer] = {
    # dictionary_learning/__init__.py imports buffer.py, which imports nnsight (pinned < 0.4 by the package);
    # the trainers need only torch and einops. Its other requirements (wandb, umap, circuitsvis, plotly,
    # pandas, zstandard, datasets) serve training.py, interp.py and utils.py, which the steps do not import.
    # nnsight 0.3.7 itself is installed bare: its own list asks for torchvision and diffusers, and PyPI's
    # torchvision is a CUDA build that fails to load beside the CPU torch ("operator torchvision::nms does
    # not exist"); `import nnsight` needs transformers (< 5, as in its time), accelerate, python-socketio,
    # pillow, requests and pyyaml.
    "dictionary_learning": Peer("dictionary_learning", "dictionary-learning==0.1.0", "dictionary_learning",
                                "DL_PYTHON", no_deps=True, extra=("einops", "transformers<5", "accelerate",
                                                                  "pydantic", "python-socketio[client]",
                                                                  "pillow", "requests", "pyyaml", "safetensors"),
                                bare=("nnsight==0.3.7",)),
    # sae_lens/__init__.py imports its whole stack (transformer_lens, datasets, wandb ...): all its deps.
    "saelens": Peer("saelens", "sae-lens==6.54.12", "sae_lens", "SAELENS_PYTHON", extra=("safetensors",)),
    # sparsify/__init__.py imports trainer.py (datasets, schedulefree, transformers) and utils.py (accelerate);
    # its metadata asks for exactly these, unpinned, so resolving them under the torch constraint is enough.
    "sparsify": Peer("sparsify", "eai-sparsify==1.3.3", "sparsify", "SPARSIFY_PYTHON", extra=("safetensors",)),
    # SAEDashboard 0.8.0 asks for sae-lens 6 but transformer-lens < 3 and transformers < 4.57, which the
    # saelens venv (transformer-lens 3.9) does not satisfy: its own venv, all its dependencies resolved. That
    # resolution keeps numpy 1.26, which the newest pyarrow (via datasets) refuses: pyarrow < 20. PyPI's
    # torchvision is a CUDA build that breaks `import transformers` beside the CPU torch
    # ("operator torchvision::nms does not exist"); nothing here uses it or torchaudio: both are removed.
    "saedashboard": Peer("saedashboard", "sae-dashboard==0.8.0", "sae_dashboard.sae_vis_runner",
                         "SAEDASHBOARD_PYTHON", extra=("pyarrow<20",), remove=("torchvision", "torchaudio")),
}


def venv_root() -> Path:
    return Path(os.environ.get(VENVS_ENV) or Path.home() / ".cache" / "dictionaries-bench" / "venvs")


def venv_python(peer: str) -> Path:
    return venv_root() / peer / "bin" / "python"


def _spec(peer: Peer) -> dict:
    """What a venv was built from; a different spec means a rebuild."""
    spec = {"torch": TORCH, **asdict(peer), "python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    if not peer.remove:
        del spec["remove"]            # the venvs built before `remove` existed keep their spec
    return spec


def _recorded(folder: Path, name: str) -> str | None:
    path = folder / name
    return path.read_text().strip() if path.exists() else None


def python_for(name: str, build: bool = True, retry: bool = False) -> tuple[str | None, str]:
    """(interpreter, note): a ready interpreter for the peer, or None and one line saying why not.

    The peer's environment variable wins; else the cached venv, built here when missing (unless `build` is
    False or DICTIONARIES_BENCH_NO_INSTALL=1). A failure recorded for the same spec is only retried with `retry`
    (`python -m benchmarks.peers build`), so that a benchmark run does not repeat a failing install each time.
    """
    peer = PEERS[name]
    if os.environ.get(peer.python_env):
        return os.environ[peer.python_env], f"{peer.python_env}={os.environ[peer.python_env]}"
    folder = venv_root() / name
    spec = json.dumps(_spec(peer), sort_keys=True)
    if _recorded(folder, SPEC_FILE) == spec and venv_python(name).exists():
        failed = _recorded(folder, FAILED_FILE)
        if not failed:
            return str(venv_python(name)), str(folder)
        if not (build and retry):
            return None, f"not installed: {failed}"
    if not build or os.environ.get(NO_INSTALL_ENV) == "1":
        return None, f"not installed: run `python -m benchmarks.peers build {name}` (or set {peer.python_env})"
    error = build_venv(name)
    return (None, f"not installed: {error}") if error else (str(venv_python(name)), str(folder))


def build_venv(name: str, log=sys.stderr) -> str | None:
    """(Re)build the peer's venv; None on success, else the one-line reason (also recorded beside it)."""
    peer, folder = PEERS[name], venv_root() / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    print(f"[peers] building {name} in {folder} ...", file=log, flush=True)
    error = _install(peer, folder)
    if error is None:
        error = _check_import(peer)
    if error:
        (folder / FAILED_FILE).write_text(error + "\n")
    (folder / SPEC_FILE).write_text(json.dumps(_spec(peer), sort_keys=True) + "\n")
    print(f"[peers] {name}: {error or 'ok'}", file=log, flush=True)
    return error


def _install(peer: Peer, folder: Path) -> str | None:
    made = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True)
    if made.returncode:
        folder.mkdir(parents=True, exist_ok=True)
        return "python -m venv failed: " + _last_line(made.stderr)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(TORCH + "\n")
    steps = [[TORCH], ["-c", constraints.name, *(["--no-deps"] if peer.no_deps else []), peer.requirement]]
    if peer.extra:
        steps.append(["-c", constraints.name, *peer.extra])
    if peer.bare:
        steps.append(["--no-deps", *peer.bare])
    if peer.remove:
        steps.append(["UNINSTALL", *peer.remove])
    try:
        for args in steps:
            command = pip[:-3] + ["uninstall", "-y", *args[1:]] if args[0] == "UNINSTALL" else pip + args
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if done.returncode:
                return f"pip install {' '.join(a for a in args if a != constraints.name)}: " + _last_line(done.stderr)
    except subprocess.TimeoutExpired:
        return "pip install took over 30 minutes"
    finally:
        os.unlink(constraints.name)
    return None


def _check_import(peer: Peer) -> str | None:
    """The peer imports, and torch is still the pinned version (a dependency must not have replaced it)."""
    code = f"import torch, {peer.module}; print(torch.__version__)"
    done = subprocess.run([str(venv_python(peer.name)), "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode:
        return f"import {peer.module} fails: " + _last_line(done.stderr)
    version = done.stdout.strip().splitlines()[-1]
    if not version.startswith(TORCH.split("==")[1]):
        return f"torch became {version} (expected {TORCH})"
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no message")[:240]


def peer_version(python: str, name: str) -> str:
    """The installed version of the peer's distribution, read by its own interpreter."""
    dist = PEERS[name].requirement.split("==")[0]
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() if done.returncode == 0 else "?"


def main(argv: list[str]) -> int:
    command, names = (argv[0] if argv else "status"), (argv[1:] or list(PEERS))
    for name in names:
        if command == "build":
            print(name, python_for(name, build=True, retry=True)[1])
        else:
            print(name, python_for(name, build=False)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
