"""Writing a registry entry: its card under cards/ and its block in registry.yaml, as one journalled change.

`publish --register`, `mirror` and `pin` call `register_entry`; the journal it writes is finished by the next
reader (`registry.load_registry`) when a kill cut it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from dictionaries.card import Card
from dictionaries.files import replay_journal, write_together
from dictionaries.locations import Location
from dictionaries.registry import Registry, _journal, _registry_lock, default_registry_path


def register_entry(card: Card, location: Location, registry_path: str | Path | None = None) -> Path:
    """Write (or replace) the entry in registry.yaml and its card in cards/ as one change; the registry path.

    `publish --register` and `mirror` call it only after the commit it points at exists. Comments and other
    entries in registry.yaml are kept: only the entry's own block is replaced or appended. Both files go
    through one journal (`files.write_together`): a kill between the card and registry.yaml is finished by
    the next `load_registry` or registration, so the registry never pins one commit while the card holds
    another's hashes. If the registry no longer validates afterwards, both are put back as they were.
    """
    reg = Path(registry_path) if registry_path else default_registry_path()
    with _registry_lock(reg):
        replay_journal(_journal(reg))  # a registration killed half-way is finished first
        for pattern in (f".{reg.name}.*.tmp", f".{_journal(reg).name}.*.tmp"):  # a killed registration's
            for stale in reg.parent.glob(pattern):                                # write_atomic temporaries
                stale.unlink(missing_ok=True)
        text = reg.read_text()
        old = ((yaml.safe_load(text) or {}).get("entries") or {}).get(card.name)
        card_rel = old["card"] if old else f"{card.name}.yaml"
        card_path = reg.parent / "cards" / card_rel
        old_card = card_path.read_text() if card_path.exists() else None
        new_text = _replace_entry(text, card.name, entry_block(card.name, card_rel, location))
        write_together(_journal(reg), {card_path: card_text(card), reg: new_text})
        try:
            Registry(reg)  # validated as load_registry would (which would wait on the lock held here)
        except BaseException:
            write_together(_journal(reg), {card_path: old_card, reg: text})
            raise
    return reg



def card_text(card: Card) -> str:
    """A card as the YAML file under cards/ (a header line, then the fields in schema order)."""
    header = f"# Card of {card.name}: see DESIGN.md section 4 and `dictctl schema`.\n"
    return header + yaml.safe_dump(card.model_dump(mode="json", exclude_none=True), sort_keys=False, width=110)


def entry_block(name: str, card_rel: str, location: Location) -> str:
    """The lines of registry.yaml for one entry."""
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
