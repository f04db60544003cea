"""`dictctl`, the command line and the package's one composition root.

Each command parses its arguments, calls one library function and prints the result. Errors are turned
into one readable line by the table `ERROR_MESSAGES` (exit code 1); `DICTIONARIES_DEBUG=1` shows the
traceback instead. `training/` is imported only inside the commands that need it, and torch only where a
command touches tensors, so `dictctl list` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dictionaries import errors
from dictionaries.cli_output import hook_options, print_publish
from dictionaries.constants import ENV_DEBUG

app = typer.Typer(help="Pretrained sparse-autoencoder dictionaries: browse, load, train, evaluate, publish.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
# Wide enough for the `list` table even when piped (rich falls back to 80 columns without a terminal).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

HOOK_HELP = "MODULE_PATH[:input|:output] to use instead of the card's hook point."
SITE_HELP = "resid_pre/mid/post, mlp_in/out, attn_out, attn_z, mlp_post, with --layer (via the model's family)."

# error class -> (label, advice); the first class in the table that the error is an instance of wins.
ERROR_MESSAGES: list[tuple[type[BaseException], str, str]] = [
    (errors.UnknownNameError, "unknown name", ""),
    (errors.CardError, "invalid card", "Fix the field named above; `dictctl schema` shows every field."),
    (errors.RegistryError, "invalid registry", ""),
    (errors.HashMismatchError, "hash mismatch", ""),
    (errors.HubUnreachableError, "hub unreachable", ""),
    (errors.MissingFileError, "missing file", ""),
    (errors.ModelMismatchError, "dictionary of another model", ""),
    (errors.ShapeMismatchError, "shape mismatch", ""),
    (errors.HookPointError, "unknown hook point", ""),
    (errors.NotWrappedError, "model not wrapped", ""),
    (errors.FeatureIndexError, "feature out of range", ""),
    (errors.OutsideTraceError, "outside a trace", ""),
    (errors.FormatError, "bad format", ""),
    (errors.ArchitectureMismatchError, "card does not match the dictionary", ""),
    (errors.DtypeDeviceError, "dtype/device mismatch", ""),
    (errors.UnknownPresetError, "unknown preset", ""),
    (errors.RecipeError, "invalid recipe", "Fix the fields named above; `dictctl schema` shows every recipe field."),
    (errors.RepoNameError, "invalid repo name", ""),
    (errors.CardFilesMismatchError, "card does not match files", ""),
    (errors.TargetOccupiedError, "target occupied", ""),
    (errors.HubAuthError, "hub authentication", ""),
    (errors.PublishError, "publish failed", ""),
    (errors.DatasetColumnError, "unknown dataset column", ""),
    (errors.RecipeMismatchError, "checkpoint of another recipe", ""),
    (errors.SharedHarvestError, "recipes cannot share a pass", ""),
    (errors.OutOfDataError, "out of data", ""),
    (errors.NonFiniteLossError, "not finite", ""),
    (errors.EvalInputError, "cannot evaluate", ""),
    (errors.ModelLoadError, "cannot load model", ""),
    (errors.HubPathError, "bad hub path", ""),
    (errors.LocalHubError, "local hub", ""),
    (errors.InvalidArgumentError, "bad argument", ""),
    (errors.DictionariesError, "error", ""),
]


def report(exc: BaseException) -> int:
    """Print an error as one line from the table; return the exit code."""
    for cls, label, advice in ERROR_MESSAGES:
        if isinstance(exc, cls):
            _error_line(label, f"{exc}" + (f" {advice}" if advice else ""))
            return 1
    raise exc


def main() -> None:
    """Entry point of the console script: every failure becomes one line on stderr and a non-zero exit code."""
    try:
        app(standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - the one place every failure is turned into an exit code
        sys.exit(exit_code(exc))


def exit_code(exc: BaseException) -> int:
    """Print what went wrong as one line (the traceback too with DICTIONARIES_DEBUG=1) and return the exit code.

    typer carries its own copy of click, so its usage errors are recognised by their interface (`exit_code`,
    `format_message`), not by click's classes; click turns Ctrl-C and EOFError into Abort, whose cause is
    the real failure (an OutOfDataError is an EOFError).
    """
    cause = exc.__cause__ if isinstance(exc, typer.Abort) and exc.__cause__ is not None else exc
    if isinstance(cause, SystemExit):
        return cause.code if isinstance(cause.code, int) else 1
    if isinstance(cause, typer.Exit):
        return cause.exit_code
    if type(cause).__name__ == "NoArgsIsHelpError":  # `dictctl` alone, or a command without its arguments
        cause.show()
        return 0
    if os.environ.get(ENV_DEBUG) == "1":
        raise exc
    if isinstance(cause, errors.DictionariesError):
        return report(cause)
    if isinstance(cause, KeyboardInterrupt) or isinstance(exc, typer.Abort):
        _error_line("interrupted", "stopped by the user (a training run continues with --resume)")
        return 130
    if hasattr(cause, "format_message") and hasattr(cause, "exit_code"):  # click's usage errors
        ctx = getattr(cause, "ctx", None)
        command = ctx.command_path if ctx is not None else "dictctl"
        _error_line("usage", f"{cause.format_message()} (`{command} --help` shows the usage)")
        return 1
    _error_line("internal error", f"{type(cause).__name__}: {cause} (set {ENV_DEBUG}=1 for the traceback)")
    return 1


def _error_line(label: str, message: str) -> None:
    one_line = " ".join(str(message).split())
    err_console.print(f"[bold red]{label}:[/] {one_line}", highlight=False, soft_wrap=True, markup=True)


# ---- browsing ---------------------------------------------------------------------------------------
@app.command("list")
def list_(model: Optional[str] = typer.Option(None, help="Model prefix (pythia70m) or HF id."),
          site: Optional[str] = typer.Option(None, help="embed, attn, mlp or resid."),
          layer: Optional[int] = typer.Option(None, min=0, help="Block index."),
          size: Optional[int] = typer.Option(None, min=1, help="Number of features."),
          architecture: Optional[str] = typer.Option(None, help="relu, topk, batchtopk, jumprelu, gated.")) -> None:
    """Table of registry entries with their headline stats."""
    from dictionaries.registry import load_registry

    entries = load_registry().filter(model=model, site=site, layer=layer, size=size, architecture=architecture)
    table = Table(show_lines=False)
    for col in ("name", "model", "site", "layer", "size", "arch", "L0", "loss rec.", "stats", "verified"):
        table.add_column(col, justify="right" if col in ("layer", "size", "L0", "loss rec.") else "left")
    for e in entries:
        c, s = e.card, e.card.stats
        table.add_row(e.name, c.model.id if c.model else "?", e.site or "?", _fmt(e.layer), str(c.d_dict),
                      c.architecture, _fmt(s.l0 if s else None), _fmt(s.frac_loss_recovered if s else None),
                      s.source if s else "-", "yes" if c.verified else "[yellow]no[/]")
    console.print(table)
    console.print(f"{len(entries)} entries")


@app.command()
def show(name: str = typer.Argument(..., help="Registry name or alias."),
         as_json: bool = typer.Option(False, "--json", help="Print the card as JSON.")) -> None:
    """The whole card of an entry."""
    from dictionaries.registry import load_registry

    entry = load_registry().get(name)
    data = entry.card.model_dump(mode="json", exclude_none=True)
    data["location"] = entry.location.model_dump(mode="json")
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


@app.command()
def schema() -> None:
    """The card's JSON Schema."""
    from dictionaries.card import card_schema

    print(json.dumps(card_schema(), indent=2))


# ---- publishing ------------------------------------------------------------------------------------
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
             dashboard: Optional[str] = typer.Option(None, "--dashboard", help="Site folder to add (same commit).")
             ) -> None:
    """Validate a native folder, stage it with a model card, upload it in one commit, print its registry entry."""
    from dictionaries.publish import publish

    result = publish(folder, repo, subfolder=subfolder, branch=branch, private=private, dry_run=dry_run,
                     register=register, force=force, local_hub=local_hub, staging_dir=staging_dir, dashboard=dashboard)
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


# ---- evaluation ------------------------------------------------------------------------------------
@app.command("eval")
def eval_(ref: str = typer.Argument(..., help="Registry name, native folder, or a glob of either (one model)."),
          dataset: Optional[str] = typer.Option(None, help="Local text file/folder or dataset id "
                                                "(default: the card's recipe dataset)."),
          tokens: int = typer.Option(16384, min=1, help="Eval tokens."),
          batch_size: int = typer.Option(8, min=1, help="Contexts per forward."),
          context_length: int = typer.Option(128, min=2, help="Tokens per context."),
          device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default cpu)."),
          model: Optional[str] = typer.Option(None, help="Model folder (save_pretrained + tokenizer) or HF id "
                                              "(default: the card's model)."),
          out: Optional[str] = typer.Option(None, help="Write evaluated native folders under DIR/<name> "
                                            "(registry entries default to ./evaluated)."),
          no_sensitivity: bool = typer.Option(False, "--no-sensitivity",
                                              help="Skip the sensitive-directions test."),
          hook: Optional[str] = typer.Option(None, "--hook", help=HOOK_HELP),
          site: Optional[str] = typer.Option(None, "--site", help=SITE_HELP),
          layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index for --site.")) -> None:
    """Measure every stat, write it into the card, save density.safetensors, density.png and sensitivity.png."""
    from training.evaluate import evaluate_and_write

    for folder, card in evaluate_and_write(ref, model=model, dataset=dataset, tokens=tokens,
                                           context_length=context_length, batch_size=batch_size, device=device,
                                           out=out, sensitivity=not no_sensitivity,
                                           hook=hook_options(hook, site, layer)):
        s = card.stats
        console.print(f"[bold]{card.name}[/] -> {folder}: loss recovered {_fmt(s.frac_loss_recovered)}, "
                      f"FVU {_fmt(s.fvu)}, L0 {_fmt(s.l0)}, alive {_fmt(s.frac_alive)} ({s.tokens} tokens)",
                      highlight=False)
        if s.hidden_change_spliced is not None:  # an encoder without an LM head: say what stands in
            console.print(f"  no LM head, so loss recovered does not apply; final hidden state moves "
                          f"{_fmt(s.hidden_change_spliced)} (relative) spliced, {_fmt(s.hidden_change_zero)} "
                          "zero-ablated", highlight=False)


@app.command()
def compare(a: str = typer.Argument(..., help="Registry name or folder (card.json)."),
            b: str = typer.Argument(..., help="Registry name or folder (card.json).")) -> None:
    """Two cards' stats side by side."""
    from dictionaries.card import compare_stats
    from dictionaries.registry import card_of

    (name_a, name_b), rows = compare_stats(card_of(a), card_of(b))
    table = Table(title="stats")
    for col, justify in (("stat", "left"), (name_a, "right"), (name_b, "right"), ("B - A", "right")):
        table.add_column(col, justify=justify)
    for stat, va, vb, diff in rows:
        table.add_row(stat, _fmt(va), _fmt(vb), _fmt(diff))
    console.print(table)


# ---- training -------------------------------------------------------------------------------------------
@app.command("train")
def train_(name: Optional[str] = typer.Argument(None, help="Registry name or glob (several dictionaries from one "
                                                "pass); omit with --recipe holding a whole recipe."),
           tokens: Optional[int] = typer.Option(None, min=1, help="Training tokens (overrides the recipe)."),
           model: Optional[str] = typer.Option(None, help="Model HF id or local folder (save_pretrained + tokenizer)."),
           dataset: Optional[str] = typer.Option(None, help="Dataset HF id, or a local .txt file / folder / .jsonl."),
           device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when present)."),
           out: str = typer.Option("trained", help="Folder for the native outputs (DIR/<name>/) and checkpoints."),
           resume: bool = typer.Option(False, "--resume", help="Continue from DIR/checkpoint."),
           recipe: Optional[str] = typer.Option(None, help="YAML of recipe fields: overrides, or a whole recipe."),
           checkpoint_every: int = typer.Option(1000, min=1, help="Steps between checkpoints."),
           log: Optional[str] = typer.Option(None, help="Append training curves to this JSONL file.")) -> None:
    """Regenerate entries from their card recipes (or train a recipe file); writes native folders."""
    if name is None and recipe is None:
        raise typer.BadParameter("give a registry NAME (or glob), or --recipe with a whole recipe")
    from training.run import train_entries  # after the check: bad usage is said without waiting for torch
    overrides = {k: v for k, v in (("tokens", tokens), ("model.id", model), ("dataset.path", dataset)) if v is not None}
    for folder in train_entries(name, overrides=overrides, recipe_file=recipe, out=out, device=device, resume=resume,
                                checkpoint_every=checkpoint_every, log_file=log):
        console.print(f"wrote {folder}", highlight=False)


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


@app.command("convert")
def convert_cmd(src: str = typer.Argument(..., help="Folder in any supported format (native, dictionary_learning, "
                                                    "saelens, sparsify)."),
                dst: str = typer.Argument(..., help="Folder to write the native copy to (card.json + "
                                                    "weights.safetensors)."),
                format: Optional[str] = typer.Option(None, "--format", "-f", help="Source format (default: detected)."),
                hook: Optional[str] = typer.Option(None, "--hook", help=HOOK_HELP),
                site: Optional[str] = typer.Option(None, "--site", help=SITE_HELP),
                layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index for --site.")) -> None:
    """Convert a dictionary folder to the native format, with a card built from its config."""
    from dictionaries.formats import convert, summarize

    card = convert(src, dst, format=format, hook=hook_options(hook, site, layer))
    console.print(f"[green]wrote[/] {dst}", highlight=False, soft_wrap=True)
    console.print(summarize(card), highlight=False, markup=False, soft_wrap=True)


@app.command("inspect")
def inspect_cmd(name: str = typer.Argument(..., help="Registry name, alias or dictionary folder."),
                feature: int = typer.Option(..., "--feature", min=0, help="Feature index."),
                texts: str = typer.Option(..., "--texts", help="Text file, one text per line."),
                top: int = typer.Option(10, "--top", help="Number of contexts and of logit-lens tokens."),
                model: Optional[str] = typer.Option(None, "--model",
                                                    help="HF id or folder (default: the card's model)."),
                context: int = typer.Option(8, "--context", help="Tokens shown before the activating one."),
                hook: Optional[str] = typer.Option(None, "--hook", help=HOOK_HELP),
                site: Optional[str] = typer.Option(None, "--site", help=SITE_HELP),
                layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index for --site.")) -> None:
    """A feature's top-activating contexts (activating token highlighted) and the tokens it promotes."""
    from rich.markup import escape

    from dictionaries.features import inspect_named

    r = inspect_named(name, feature, texts, model=model, top=top, context=context, hook=hook_options(hook, site, layer))
    console.print(f"[bold]{escape(r.dictionary)}[/] feature {r.feature}: fires on {r.frequency:.2%} of "
                  f"{r.tokens} tokens", highlight=False)
    for ex in r.examples:
        window = "".join(f"[reverse bold]{escape(t)}[/]" if i == ex.marked else escape(t)
                         for i, t in enumerate(ex.tokens))
        console.print(f"{ex.activation:8.3f}  text {ex.text} pos {ex.position}: {window}".replace("\n", "\\n"),
                      highlight=False)
    for label, scores in (("promotes", r.promoted), ("suppresses", r.suppressed)):
        if scores:
            console.print(f"{label}: " + ", ".join(f"{escape(repr(s.token))} {s.score:+.2f}" for s in scores),
                          highlight=False)


@app.command("dashboard")
def dashboard_cmd(name: str = typer.Argument(..., help="Registry name, alias or dictionary folder."),
                  dataset: Optional[str] = typer.Option(None, help="Text file or folder, dataset id (the card's)."),
                  tokens: int = typer.Option(65_536, help="Tokens to read (one pass)."),
                  model: Optional[str] = typer.Option(None, help="HF id or folder (default: the card's model)."),
                  features: Optional[str] = typer.Option(None, help="START:STOP or N (the first N); default all."),
                  out: str = typer.Option("dashboard", help="Folder to write the site into."),
                  device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
                  serve: bool = typer.Option(False, "--serve", help="Then serve it on 127.0.0.1 until Ctrl-C."),
                  port: int = typer.Option(8000, help="Port for --serve (0: any free one).")) -> None:
    """A static web page of every feature (density, top and sampled contexts, logit lens, nearest features)."""
    from dictionaries import dashboard_site as s

    index = s.make_dashboard(name, out, dataset=dataset, tokens=tokens, model=model, features=features, device=device)
    console.print(f"[green]wrote[/] {index} ({s.site_size(index.parent) / 1e6:.2f} MB)", soft_wrap=True)
    if serve:
        s.serve(index.parent, port, say=print)


@app.command()
def demo(workdir: Optional[str] = typer.Option(None, help="Where to cache the toy model and write this run "
                                                          "(default: $HF_HOME/dictionaries/demo)."),
         tokens: int = typer.Option(120_000, help="Training tokens for the demo dictionary (the corpus holds "
                                                  "~150k; 16k more are held out to evaluate on).")) -> None:
    """The whole loop offline: local hub, toy model, train, evaluate, publish, load by name, attach."""
    from dictionaries.demo import run_demo

    run_demo(workdir, tokens=tokens)


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    main()
