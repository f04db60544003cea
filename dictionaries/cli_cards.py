"""`dictctl` commands that read cards only (list, show, schema, compare) and `download`: none loads torch or
`training/` to answer, except download's hashing of fetched files.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from dictionaries import errors
from dictionaries.cli_app import app, console, err_console
from dictionaries.cli_app import fmt_value as _fmt


@app.command("list")
def list_(model: Optional[str] = typer.Option(None, help="Model prefix (pythia70m) or HF id."),
          site: Optional[str] = typer.Option(None, help="embed, attn, mlp or resid."),
          layer: Optional[int] = typer.Option(None, min=0, help="Block index."),
          size: Optional[int] = typer.Option(None, min=1, help="Number of features."),
          architecture: Optional[str] = typer.Option(None, help="relu, topk, batchtopk, jumprelu, gated.")) -> None:
    """Table of registry entries with their headline stats."""
    from dictionaries.pinning import local_pin, pin_state
    from dictionaries.registry import load_registry

    entries = load_registry().filter(model=model, site=site, layer=layer, size=size, architecture=architecture)
    table = Table(show_lines=False)
    for col in ("name", "model", "site", "layer", "size", "arch", "L0", "loss rec.", "stats", "pin"):
        table.add_column(col, justify="right" if col in ("layer", "size", "L0", "loss rec.") else "left")
    for e in entries:
        c, s = e.card, e.card.stats
        table.add_row(e.name, c.model.id if c.model else "?", e.site or "?", _fmt(e.layer), str(c.d_dict),
                      c.architecture, _fmt(s.l0 if s else None), _fmt(s.frac_loss_recovered if s else None),
                      s.source if s else "-", _pin_label(e, pin_state(e), local_pin))
    console.print(table)
    console.print(f"{len(entries)} entries")


def _pin_label(entry, state: str, local_pin) -> str:
    """The pin column: pinned; unhashed (commit or URL known, no sha256 yet); unpinned, or pinned on this
    machine only (by a first load: `dictctl pin` puts it in the card)."""
    if state == "pinned":
        return "pinned"
    if state == "unhashed":
        return "[yellow]unhashed[/]"
    return "[yellow]local[/]" if local_pin(entry) is not None else "[red]unpinned[/]"


@app.command()
def show(name: str = typer.Argument(..., help="Registry name or alias."),
         as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
         feature: Optional[int] = typer.Option(None, "--feature", min=0, help="Also this feature's Neuronpedia URL.")
         ) -> None:
    """The whole card of an entry (and its Neuronpedia page, where it has one)."""
    from dictionaries.neuronpedia import neuronpedia_url
    from dictionaries.registry import load_registry

    entry = load_registry().get(name)
    url = neuronpedia_url(entry.card, feature)
    data = entry.card.model_dump(mode="json", exclude_none=True)
    data["location"] = entry.location.model_dump(mode="json")
    if url:
        data["neuronpedia_url"] = url
    if as_json:
        print(json.dumps(data, indent=2))
        return
    import yaml

    console.print(yaml.safe_dump(data, sort_keys=False, width=110), highlight=False, markup=False)
    if entry.card.stats is not None and entry.card.stats.density:
        d = entry.card.stats.density
        console.print(f"feature density: {int(d.get('dead', 0))} dead of {int(d.get('features', 0))}, "
                      f"{int(d.get('above_1e-1', 0))} above 1e-1, median log10 {_fmt(d.get('median_log10'))}",
                      highlight=False)
    if url:
        console.print(f"neuronpedia: {url}", highlight=False, soft_wrap=True)


@app.command()
def schema() -> None:
    """The card's JSON Schema."""
    from dictionaries.card import card_schema

    print(json.dumps(card_schema(), indent=2))


@app.command()
def compare(a: str = typer.Argument(..., help="Registry name or folder (card.json)."),
            b: str = typer.Argument(..., help="Registry name or folder (card.json).")) -> None:
    """Two cards' stats side by side."""
    from dictionaries.card import compare_stats
    from dictionaries.references import card_of

    (name_a, name_b), rows = compare_stats(card_of(a), card_of(b))
    table = Table(title="stats")
    for col, justify in (("stat", "left"), (name_a, "right"), (name_b, "right"), ("B - A", "right")):
        table.add_column(col, justify=justify)
    for stat, va, vb, diff in rows:
        table.add_row(stat, _fmt(va), _fmt(vb), _fmt(diff))
    console.print(table)


@app.command("download")
def download_cmd(names: list[str] = typer.Argument(..., help="Registry names, aliases or globs (pythia70m/mlp*/8192)."),
                 force: bool = typer.Option(False, "--force", help="Fetch again even when cached."),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")) -> None:
    """Fetch entries into the HF cache (HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE apply) and verify every sha256."""
    import warnings

    from dictionaries.loader import download

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", errors.UnverifiedFilesWarning)
        folders = download(names, force=force, progress=not quiet)
    for w in caught:
        label = "unverified" if isinstance(w.message, errors.UnverifiedFilesWarning) else "warning"
        err_console.print(f"[yellow]{label}:[/] {w.message}", highlight=False, soft_wrap=True)
    for name, folder in folders.items():
        console.print(f"[green]ok[/] {name}  {folder}", highlight=False, soft_wrap=True)


@app.command("export")
def export_cmd(kind: str = typer.Argument(..., help="What to export for: neuronpedia."),
               name: str = typer.Argument(..., help="Registry name, alias or native folder."),
               out: str = typer.Option(..., "--out", help="Folder to write into (<out>/<model>/<source>/)."),
               dashboard: Optional[str] = typer.Option(None, "--dashboard", help="A `dictctl dashboard` site: its "
                                                       "features and top contexts are exported too."),
               model: Optional[str] = typer.Option(None, "--model", help="Neuronpedia model id (default: the "
                                                   "card's Neuronpedia id, else its model's name)."),
               source_set: Optional[str] = typer.Option(None, "--source-set", help="Neuronpedia source set "
                                                        "(default: the card's, else <site>-<features>)."),
               creator: Optional[str] = typer.Option(None, "--creator", help="Creator name (default: authors).")
               ) -> None:
    """The files a Neuronpedia upload takes, in the layout of Neuronpedia's own export converter."""
    from dictionaries.neuronpedia import export_neuronpedia

    if kind != "neuronpedia":
        raise errors.InvalidArgumentError("kind", kind, "the one export is `neuronpedia`")
    folder = export_neuronpedia(name, out, dashboard=dashboard, model=model, source_set=source_set, creator=creator)
    console.print(f"[green]written[/] {folder}", highlight=False, soft_wrap=True)
