"""Writing a registry entry: its line in registry.yaml and its card under cards/, atomically and serialised.

`publish --register` and `mirror` call `register_entry` only after the commit it points at exists. The
registry written is the one in use (`DICTIONARIES_REGISTRY`, else the packaged one) unless a path is given.
Comments and other entries in registry.yaml are kept: only the entry's own block is replaced or appended.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from dictionaries.card import Card
from dictionaries.registry import HubLocation, default_registry_path, load_registry


def register_entry(card: Card, location: HubLocation, registry_path: str | Path | None = None) -> Path:
    """Write (or replace) the entry in registry.yaml and its card in cards/, atomically; the registry path.

    Both files are written next to their targets and renamed into place; if the registry no longer
    validates afterwards, both are put back as they were.
    """
    reg = Path(registry_path) if registry_path else default_registry_path()
    with _registry_lock(reg):
        _register_locked(card, location, reg)
    return reg


def _register_locked(card: Card, location: HubLocation, reg: Path) -> None:
    text = reg.read_text()
    index = yaml.safe_load(text) or {}
    old = (index.get("entries") or {}).get(card.name)
    card_rel = old["card"] if old else f"{card.name}.yaml"
    card_path = reg.parent / "cards" / card_rel
    card_path.parent.mkdir(parents=True, exist_ok=True)
    old_card = card_path.read_bytes() if card_path.exists() else None
    header = f"# Card of {card.name}: see DESIGN.md section 4 and `dictctl schema`.\n"
    _write_atomic(card_path, header + yaml.safe_dump(card.model_dump(mode="json", exclude_none=True),
                                                     sort_keys=False, width=110))
    try:
        _write_atomic(reg, _replace_entry(text, card.name, entry_block(card.name, card_rel, location)))
        load_registry(reg)
    except BaseException:
        _write_atomic(reg, text)
        if old_card is None:
            card_path.unlink(missing_ok=True)
        else:
            _write_atomic(card_path, old_card)
        raise


@contextmanager
def _registry_lock(reg: Path):
    """Serialise registrations into one registry (two publishes at once would otherwise lose an entry).
    The lock file lives in the temp folder, keyed by the registry's path, so nothing lands in the checkout."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    key = hashlib.sha256(str(reg.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"dictionaries-registry-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def entry_block(name: str, card_rel: str, location: HubLocation) -> str:
    body = {name: {"card": card_rel, "location": location.model_dump(mode="json")}}
    return "\n".join("  " + line for line in yaml.safe_dump(body, sort_keys=False).splitlines()) + "\n"


def _replace_entry(text: str, name: str, block: str) -> str:
    """registry.yaml's text with `name`'s block replaced (or appended), comments elsewhere kept."""
    lines = text.splitlines(keepends=True)
    head = re.compile(rf"^  ['\"]?{re.escape(name)}['\"]?:\s*$")
    start = next((i for i, line in enumerate(lines) if head.match(line)), None)
    if start is None:
        return text + ("" if text.endswith("\n") else "\n") + block
    end = start + 1
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        end += 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def _write_atomic(path: Path, content: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode() if isinstance(content, str) else content)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the registry is read by everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
