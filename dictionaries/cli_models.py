"""`dictctl` commands that run a model: eval, train, convert, inspect, dashboard and the demo. `training/` is
imported inside the commands that need it, after their arguments are checked.
"""

from __future__ import annotations

from typing import Optional

import typer

from dictionaries.cli_app import DEVICE_MAP_HELP, HOOK_HELP, MODEL_DTYPE_HELP, SITE_HELP, app, console
from dictionaries.cli_app import fmt_value as _fmt
from dictionaries.cli_output import hook_options


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
          layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index for --site."),
          model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help=MODEL_DTYPE_HELP + " Default: the "
                                                    "recipe's model_dtype, else fp32."),
          device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP)) -> None:
    """Measure every stat, write it into the card, save density.safetensors, density.png and sensitivity.png."""
    from training.evaluate import evaluate_and_write

    for folder, card in evaluate_and_write(ref, model=model, dataset=dataset, tokens=tokens,
                                           context_length=context_length, batch_size=batch_size, device=device,
                                           out=out, sensitivity=not no_sensitivity,
                                           hook=hook_options(hook, site, layer), model_dtype=model_dtype,
                                           device_map=device_map):
        s = card.stats
        console.print(f"[bold]{card.name}[/] -> {folder}: loss recovered {_fmt(s.frac_loss_recovered)}, "
                      f"FVU {_fmt(s.fvu)}, L0 {_fmt(s.l0)}, alive {_fmt(s.frac_alive)} ({s.tokens} tokens)",
                      highlight=False)
        if s.hidden_change_spliced is not None:  # an encoder without an LM head: say what stands in
            console.print(f"  no LM head, so loss recovered does not apply; final hidden state moves "
                          f"{_fmt(s.hidden_change_spliced)} (relative) spliced, {_fmt(s.hidden_change_zero)} "
                          "zero-ablated", highlight=False)


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
           log: Optional[str] = typer.Option(None, help="Append training curves to this JSONL file."),
           model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help=MODEL_DTYPE_HELP + " Sets the "
                                                     "recipe's model_dtype."),
           device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
           autocast: Optional[str] = typer.Option(None, "--autocast", help="bf16, fp16 or none: precision of the "
                                                  "dictionary's forward in training (sets the recipe's autocast)."),
           eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens", min=0,
                                                     help="Held-out tokens the end-of-run evaluation reads (default: "
                                                          "the recipe's holdout_tokens); 0 skips it.")) -> None:
    """Regenerate entries from their card recipes (or train a recipe file); writes native folders."""
    if name is None and recipe is None:
        raise typer.BadParameter("give a registry NAME (or glob), or --recipe with a whole recipe")
    if model_dtype is not None or device_map is not None:  # placement imports torch: only when asked
        from dictionaries.placement import dtype_name, parse_device_map
        model_dtype, device_map = model_dtype and dtype_name(model_dtype), parse_device_map(device_map)
    overrides = {k: v for k, v in (("tokens", tokens), ("model.id", model), ("dataset.path", dataset),
                                   ("model_dtype", model_dtype), ("autocast", autocast and _autocast_name(autocast)))
                 if v is not None}
    from training.entries import train_entries  # names and recipes checked before torch is imported
    for folder in train_entries(name, overrides=overrides, recipe_file=recipe, out=out, device=device, resume=resume,
                                checkpoint_every=checkpoint_every, log_file=log, device_map=device_map,
                                eval_tokens=eval_tokens):
        console.print(f"wrote {folder}", highlight=False)
    if eval_tokens == 0:
        console.print("stats not measured (--eval-tokens 0): `dictctl eval FOLDER` measures them later",
                      highlight=False)


def _autocast_name(value: str) -> str:
    """The recipe's `autocast` for a name given the way --model-dtype takes dtypes (bf16, bfloat16, fp16, half),
    none/off/fp32 for full precision; InvalidArgumentError listing them otherwise."""
    from dictionaries.errors import InvalidArgumentError
    from dictionaries.placement import MODEL_DTYPES, dtype_name

    key = value.strip().lower().removeprefix("torch.")
    if key not in MODEL_DTYPES and key not in ("none", "off"):
        raise InvalidArgumentError("autocast", value, "expected bf16, fp16 or none (bfloat16, float16, fp32)")
    name = "none" if key in ("none", "off") else dtype_name(key)
    return "none" if name == "float32" else name


@app.command("convert")
def convert_cmd(src: str = typer.Argument(..., help="Folder in any supported format (native, dictionary_learning, "
                                                    "saelens, sparsify, gemma_scope, llama_scope, goodfire)."),
                dst: str = typer.Argument(..., help="Folder to write the copy to (native: card.json + "
                                                    "weights.safetensors)."),
                format: Optional[str] = typer.Option(None, "--format", "-f", help="Source format (default: detected)."),
                to: str = typer.Option("native", "--to", help="Layout to write: native, saelens, sparsify or "
                                                              "dictionary_learning."),
                hook: Optional[str] = typer.Option(None, "--hook", help=HOOK_HELP),
                site: Optional[str] = typer.Option(None, "--site", help=SITE_HELP),
                layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index for --site.")) -> None:
    """Convert a dictionary folder to native (or --to another library's layout), with a card built from its config."""
    from dictionaries.formats import convert, summarize

    card = convert(src, dst, format=format, hook=hook_options(hook, site, layer), to=to)
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
                layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Block index for --site."),
                model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help=MODEL_DTYPE_HELP),
                device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP)) -> None:
    """A feature's top-activating contexts (activating token highlighted) and the tokens it promotes."""
    from rich.markup import escape

    from dictionaries.features import inspect_named

    r = inspect_named(name, feature, texts, model=model, top=top, context=context, hook=hook_options(hook, site, layer),
                      model_dtype=model_dtype, device_map=device_map)
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
    if r.no_lens:
        console.print(f"logit lens: none; {escape(r.no_lens)}", highlight=False)
    if r.neuronpedia:
        console.print(f"neuronpedia: {r.neuronpedia}", highlight=False, soft_wrap=True)


@app.command("dashboard")
def dashboard_cmd(name: str = typer.Argument(..., help="Registry name, alias or dictionary folder."),
                  dataset: Optional[str] = typer.Option(None, help="Text file or folder, dataset id (the card's)."),
                  tokens: int = typer.Option(65_536, help="Tokens to read (one pass)."),
                  model: Optional[str] = typer.Option(None, help="HF id or folder (default: the card's model)."),
                  features: Optional[str] = typer.Option(None, help="START:STOP or N (the first N); default all."),
                  out: str = typer.Option("dashboard", help="Folder to write the site into."),
                  device: Optional[str] = typer.Option(None, help="cpu, cuda, ..."),
                  serve: bool = typer.Option(False, "--serve", help="Then serve it on 127.0.0.1 until Ctrl-C."),
                  port: int = typer.Option(8000, help="Port for --serve (0: any free one)."),
                  model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help=MODEL_DTYPE_HELP),
                  device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP)) -> None:
    """A static web page of every feature (density, top and sampled contexts, logit lens, nearest features)."""
    from dictionaries import dashboard_site as s

    index = s.make_dashboard(name, out, dataset=dataset, tokens=tokens, model=model, features=features, device=device,
                             model_dtype=model_dtype, device_map=device_map)
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
