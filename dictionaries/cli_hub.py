"""`dictctl` commands that write to the Hub: publish and mirror (mirror evaluates through `training/`, imported
inside the command: dictionaries/ never imports training/ at module level).
"""

from __future__ import annotations

from typing import Optional

import typer

from dictionaries.cli_app import app, console
from dictionaries.cli_output import print_publish


@app.command("publish")
def publish_(folder: str = typer.Argument(..., help="Native dictionary folder (card.json + weights.safetensors)."),
             repo: str = typer.Option(..., "--repo", help="Hub repo ORG/NAME."),
             subfolder: str = typer.Option("", help="Folder inside the repo ('' for the root)."),
             branch: str = typer.Option("main", help="Branch to commit to."),
             private: bool = typer.Option(False, "--private", help="Create the repo private."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Stage and say what would go up; upload nothing."),
             register: bool = typer.Option(False, "--register", help="Write the entry into registry.yaml and cards/."),
             force: bool = typer.Option(False, "--force", help="Replace a different dictionary at the target."),
             local_hub: Optional[str] = typer.Option(None, "--local-hub", help="Root of a local hub (olah mirrors) "
                                                     "to commit into instead of the Hub; default "
                                                     "$DICTIONARIES_LOCAL_HUB."),
             staging_dir: Optional[str] = typer.Option(None, "--staging-dir", help="Where to stage (kept)."),
             dashboard: Optional[str] = typer.Option(None, "--dashboard", help="Site folder to add (same commit)."),
             layout: str = typer.Option("native", "--layout", help="native, saelens (SAELens' cfg.json + "
                                        "sae_weights.safetensors) or both, in one commit; saelens needs --subfolder.")
             ) -> None:
    """Validate a native folder, stage it with a model card, upload it in one commit, print its registry entry."""
    from dictionaries.publish import publish

    result = publish(folder, repo, subfolder=subfolder, branch=branch, private=private, dry_run=dry_run,
                     register=register, force=force, local_hub=local_hub, staging_dir=staging_dir, dashboard=dashboard,
                     layout=layout)
    print_publish(console, result)


@app.command("mirror")
def mirror_(name: str = typer.Argument(..., help="Registry name whose original files to mirror."),
            repo: str = typer.Option(..., "--repo", help="Hub repo ORG/NAME."),
            subfolder: Optional[str] = typer.Option(None, help="Folder inside the repo (default: the name)."),
            branch: str = typer.Option("main", help="Branch to commit to."),
            force: bool = typer.Option(False, "--force", help="Replace a different dictionary at the target."),
            no_register: bool = typer.Option(False, "--no-register", help="Do not re-point the registry entry."),
            no_eval: bool = typer.Option(False, "--no-eval", help="Do not evaluate; stats stay as they are."),
            local_hub: Optional[str] = typer.Option(None, "--local-hub", help="Root of a local hub to commit into "
                                                    "instead of the Hub; default $DICTIONARIES_LOCAL_HUB."),
            model: Optional[str] = typer.Option(None, help="Model (HF id or folder) to evaluate on; "
                                                "default the card's."),
            dataset: Optional[str] = typer.Option(None, help="Eval text (dataset id or local file); "
                                                  "default the recipe's."),
            tokens: int = typer.Option(16384, min=1, help="Eval tokens."),
            device: Optional[str] = typer.Option(None, help="Eval device.")) -> None:
    """Fetch an entry's original files, convert to native, evaluate if a model loads, publish, pin the entry."""
    from dictionaries.mirror import mirror

    evaluate, why_not = _mirror_evaluator(no_eval, model=model, dataset=dataset, tokens=tokens, device=device)
    result = mirror(name, repo, subfolder=subfolder, branch=branch, force=force, register=not no_register,
                    evaluate=evaluate, why_not=why_not, local_hub=local_hub)
    print_publish(console, result)


def _mirror_evaluator(no_eval: bool, **options):
    """training.evaluate's in-place writer for mirror (imported here: dictionaries/ never imports training/)."""
    if no_eval:
        return None, "--no-eval was given"
    try:
        from training.evaluate import evaluate_and_write
    except ImportError as e:
        return None, f"the evaluation code is not available ({e})"
    return (lambda folder: evaluate_and_write(str(folder), **options)), ""


@app.command("pin")
def pin_(names: list[str] = typer.Argument(..., help="Registry names, aliases or globs ('gpt2/*')."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")) -> None:
    """Resolve each unpinned entry's current commit, download and hash its files, and rewrite its card pinned."""
    from dictionaries.pinning import pin

    for name, where, before in pin(names, progress=not quiet):
        state = "already pinned" if before == "pinned" else f"pinned (was {before})"
        console.print(f"[green]{state}[/] {name}  {where}", highlight=False, soft_wrap=True)
