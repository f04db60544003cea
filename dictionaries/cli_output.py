"""Helpers of `dictctl` (cli.py, the composition root) kept apart so that it stays one readable file: what
`publish` and `mirror` print and the `--hook` / `--site` / `--layer` options' check.
"""

from __future__ import annotations

from typing import Any


def hook_options(hook: str | None, site: str | None, layer: int | None) -> Any:
    """The hook spec of `--hook` or `--site`/`--layer` (None when neither is given), checked before any loading."""
    from dictionaries.hook_choice import hook_spec

    return hook_spec(hook, site, layer)


def print_publish(console, result) -> None:
    """What `publish` and `mirror` print: the target, the registry entry, the files, the notes."""
    def out(line: str) -> None:  # paths and hashes are long: never wrap them
        console.print(line, highlight=False, soft_wrap=True)

    if result.dry_run:
        out(f"[bold]dry run[/]: nothing uploaded. Staged in {result.staged}; would commit to {result.target}:")
        for rel in result.uploaded:
            out(f"  {rel}")
    else:
        out(f"published [bold]{result.name}[/] to {result.target} at commit {result.location.revision}")
        out("registry entry (registry.yaml):")
        console.print(result.entry_yaml(), highlight=False, markup=False, end="", soft_wrap=True)
    out("card files:")
    for item in result.card.files.items:
        out(f"  {item.path}  {item.size} bytes  sha256 {item.sha256}")
    for note in result.notes or []:
        out(f"note: {note}")
    if result.registered:
        out(f"registered in {result.registered} (card under {result.registered.parent / 'cards'})")
