"""The science, reproduced: every named recipe trained on the same activations of a pretrained stand-in model,
its sparsity knob swept, evaluated on held-out text, and the seeds' claims checked on the result.

Phases (each timed and printed): a pretrained stand-in GPT-NeoX (training.toymodel.standin_model_folder:
4 layers, d_model 128, pretrained once on Python's own docs and standard-library docstrings, cached under the
HF cache); one harvest of MLP-output activations at a middle layer; every preset at three knob values plus
the option runs the claims need (benchmarks/recipes_grid.py, which also scales each recipe to the stand-in
and says how); one `training.evaluate.evaluate` of every dictionary on held-out documents (never pretrained
on, never harvested); claims and the Pareto plot (benchmarks/recipes_claims.py).

    python -m benchmarks recipes                          # the default budget, into bench-out/recipes
    python -m benchmarks.bench_recipes --out DIR [--device cuda --tokens N --batch B --eval-tokens E ...]

Writes recipes.json (one row per run), claims.json and recipes_pareto.png into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.recipes_grid import LR_FACTOR, PRESET_ORDER, RunSpec, option_notes, run_specs, scale_preset

DEFAULT_OUT = Path("bench-out") / "recipes"


@dataclass
class Settings:
    """One benchmark's budget and choices (the defaults fit 20 minutes on two CPU cores, pretraining included)."""

    out: Path = DEFAULT_OUT
    tokens: int = 262_144
    """Activations each dictionary trains on (the same rows, in the same order, for every run)."""
    batch_size: int = 512
    expansion: int = 8
    """d_dict = expansion * d_in."""
    eval_tokens: int = 16_384
    """Held-out tokens each dictionary is evaluated on; a feature that never fires on them counts as dead."""
    context_length: int = 64
    layer: int = 2
    """The hook is gpt_neox.layers.<layer>.mlp (output)."""
    device: str = "cpu"
    seed: int = 0
    lr_factor: float = LR_FACTOR
    presets: tuple[str, ...] = PRESET_ORDER
    knobs: int = 3
    options: bool = True
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    pretrain_steps: int = 1600
    cache_dir: Path | None = None
    """Where the stand-in is cached (default <HF_HOME>/dictionaries/standin)."""
    threads: int | None = None
    progress: bool = True


@dataclass
class StandIn:
    """The language model the dictionaries read, its tokenizer and text."""

    model: Any
    tokenizer: Any
    train_docs: list[str]
    held_out: list[str]
    info: dict = field(default_factory=dict)


def say(text: str) -> None:
    print(text, flush=True)


# ---- phase 1: the stand-in ----------------------------------------------------------------------------------
def load_standin(settings: Settings) -> StandIn:
    """The cached stand-in (pretrained here the first time; `info` says which, with the seconds it took)."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    from training.toymodel import standin_model_folder

    start = time.time()
    folder = standin_model_folder(settings.cache_dir, steps=settings.pretrain_steps, progress=settings.progress)
    record = json.loads((folder / "pretraining.json").read_text())
    docs = json.loads((folder / "documents.json").read_text())
    model = GPTNeoXForCausalLM.from_pretrained(folder).eval().to(settings.device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fresh = (folder / "pretraining.json").stat().st_mtime >= start - 1  # pretrained now, not read from the cache
    info = {"folder": str(folder), "pretrained_now": fresh, "pretraining": record}
    return StandIn(model, tokenizer, docs["train"], docs["held_out"], info)


def held_out_contexts(standin: StandIn, settings: Settings) -> torch.Tensor:
    """The first ceil(eval_tokens / C) held-out contexts (n, C), packed as evaluate() packs texts."""
    from training.evaluate import pack_batches

    batches = pack_batches(standin.held_out, tokenizer=standin.tokenizer, tokens=settings.eval_tokens,
                           context_length=settings.context_length, batch_size=1 << 30)
    return batches[0][0]


@torch.no_grad()
def ablation_check(standin: StandIn, settings: Settings) -> dict:
    """CE on the held-out contexts, clean and with each layer's MLP output zeroed (the stand-in's check: loss
    recovered means something only where zero-ablation costs clearly more than the clean loss)."""
    from dictionaries.hooks import run_patched

    ids = held_out_contexts(standin, settings).to(settings.device)          # (n, C)
    n_layers = standin.model.config.num_hidden_layers

    def ce(patches: dict) -> float:
        total, count = 0.0, 0
        for chunk in ids.split(64):
            logits = run_patched(standin.model, chunk, None, patches)       # (b, C, V)
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            total -= float(lp.gather(-1, chunk[:, 1:, None]).sum())
            count += chunk[:, 1:].numel()
        return total / count

    clean = ce({})
    zero = [ce({f"gpt_neox.layers.{i}.mlp": torch.zeros_like}) for i in range(n_layers)]
    return {"ce_clean": round(clean, 4), "ce_mlp_zeroed": [round(z, 4) for z in zero],
            "ce_increase": [round(z - clean, 4) for z in zero], "tokens": int(ids.numel())}


# ---- phase 2: one harvest -------------------------------------------------------------------------------------
def hook_point(layer: int):
    from dictionaries.recipe import HookPoint

    return HookPoint(module=f"gpt_neox.layers.{layer}.mlp", io="output", site="mlp", layer=layer)


@torch.no_grad()
def harvest(standin: StandIn, settings: Settings) -> torch.Tensor:
    """Rows (tokens, d_in) of the hook's activations from the pretraining split, contexts and rows shuffled once
    (seeded): every run reads the same rows in the same order. BOS/EOS positions are dropped (harvest.py)."""
    from training.harvest import Harvester
    from training.toymodel import pack_corpus

    contexts = pack_corpus(standin.tokenizer, settings.context_length, standin.train_docs)      # (n, C)
    gen = torch.Generator().manual_seed(settings.seed)
    contexts = contexts[torch.randperm(len(contexts), generator=gen)]
    harvester = Harvester(standin.model, [hook_point(settings.layer)], bos_id=standin.tokenizer.eos_token_id,
                          exclude_bos=True, device=settings.device)
    rows, have = [], 0
    for chunk in contexts.split(64):
        (acts,) = harvester(chunk)                                           # (tokens in chunk, d_in)
        rows.append(acts.float())
        have += len(acts)
        if have >= settings.tokens:
            break
    acts = torch.cat(rows)
    acts = acts[torch.randperm(len(acts), generator=gen, device="cpu").to(acts.device)]
    return acts[:settings.tokens]


@torch.no_grad()
def held_out_rows(standin: StandIn, settings: Settings) -> torch.Tensor:
    """The hook's activations (n, d_in) on exactly the held-out tokens evaluate() measures (BOS/EOS dropped):
    where each trained module's never-firing features are counted, before any pruning."""
    from training.harvest import Harvester

    harvester = Harvester(standin.model, [hook_point(settings.layer)], bos_id=standin.tokenizer.eos_token_id,
                          exclude_bos=True, device=settings.device)
    return torch.cat([harvester(chunk)[0].float() for chunk in held_out_contexts(standin, settings).split(64)])


@torch.no_grad()
def never_fired(module, rows: torch.Tensor) -> int:
    """How many of the module's features have f > 0 on none of `rows` (n, d_in)."""
    fired = torch.zeros(module.d_dict, dtype=torch.bool, device=rows.device)
    for chunk in rows.split(4096):
        fired |= (module.encode(chunk.to(module.W_enc.dtype)) > 0).any(0)
    return int((~fired).sum())


# ---- phase 3: training ----------------------------------------------------------------------------------------
def build_recipe(spec: RunSpec, settings: Settings, d_in: int, steps: int):
    """The validated recipe of a run: its preset, scaled to the stand-in (notes), with its knob and option."""
    from training.presets import PRESETS, preset, validate_recipe

    scaled = scale_preset(spec.preset, PRESETS[spec.preset], steps=steps, batch_size=settings.batch_size,
                          d_dict=settings.expansion * d_in, lr_factor=settings.lr_factor)
    knob = {spec.knob: int(spec.value) if spec.knob == "k" else spec.value}
    fields = preset(spec.preset, model={"id": "stand-in"}, hook=hook_point(settings.layer).model_dump(),
                    dataset={"path": "stand-in pretraining split"}, context_length=settings.context_length,
                    tokens=settings.tokens, batch_size=settings.batch_size, d_dict=settings.expansion * d_in,
                    buffer_contexts=max(1, -(-settings.batch_size // settings.context_length)), seed=settings.seed,
                    **scaled.overrides, **knob, **spec.overrides)
    return validate_recipe(fields), scaled.notes + option_notes(spec.option, steps)


def train_one(spec: RunSpec, acts: torch.Tensor, held: torch.Tensor, settings: Settings) -> tuple[Any, dict]:
    """Train one dictionary on settings.tokens rows of `acts` (N, d_in) in order; the module (card attached) and
    its record."""
    from dictionaries.card import Card, Files
    from training.trainer import Trainer

    n, d_in = acts.shape
    b = settings.batch_size
    per_pass = max(1, n // b)
    steps = max(1, settings.tokens // b)
    recipe, notes = build_recipe(spec, settings, d_in, steps)
    start = time.perf_counter()
    trainer = Trainer(recipe, d_in, total_steps=steps, device=settings.device)
    gen = torch.Generator().manual_seed(settings.seed + 7)
    trainer.estimate_input_scale(acts[:8 * b])

    def sample(count: int) -> torch.Tensor:  # resampling's candidate inputs, drawn from the harvested rows
        return acts[torch.randperm(n, generator=gen)[:count].to(acts.device)]

    last: dict = {}
    for step in range(steps):  # passes over the rows again only when --tokens exceeds the text harvested
        i = step % per_pass
        last = trainer.step(acts[i * b:(i + 1) * b], sample)
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    module = trainer.finish()
    seconds = time.perf_counter() - start
    # Dying features (seeds 000, 001, 004) are features that stop firing: counted on the module as trained, so
    # that anthropic2024's pruning (decoder norm < 0.99, which at this budget also drops features that fire) is
    # reported apart (`pruned`) instead of being counted as dying.
    silent = never_fired(trainer.module, held * trainer.input_scale) if recipe.prune_below is not None else \
        never_fired(module, held)
    name = f"standin/mlp{settings.layer}/{spec.preset}/{spec.knob}={spec.value:g}" + (
        f"/{spec.option.replace(' ', '-')}" if spec.option else "")
    module.card = Card(name=name, architecture=recipe.architecture, d_in=d_in, d_dict=module.d_dict,
                       k=getattr(module, "k", None), pre_encoder_bias=recipe.pre_encoder_bias,
                       hook=recipe.hook, files=Files(items=[]))
    record = {"steps": steps, "seconds": seconds, "d_dict_trained": recipe.d_dict, "d_dict_kept": module.d_dict,
              "never_fired": silent, "notes": notes,
              "train_dead_frac": last.get("dead_frac"), "train_l0": last.get("l0")}
    return module, record


# ---- phase 4: evaluation ----------------------------------------------------------------------------------------
def evaluate_all(standin: StandIn, modules: list, settings: Settings) -> list:
    """The project's evaluate() on the held-out documents, every dictionary in one pass (no sensitivity test)."""
    from training.evaluate import evaluate

    results = evaluate(standin.model, modules, standin.held_out, tokenizer=standin.tokenizer,
                       tokens=settings.eval_tokens, context_length=settings.context_length, batch_size=8,
                       device=settings.device, sensitivity=False, progress=settings.progress,
                       held_out="held-out stand-in documents: never pretrained on, never harvested")
    return [r.stats for r in results]


def make_row(spec: RunSpec, stats, record: dict, tokens: int) -> dict:
    """One row of recipes.json. dead_frac: features of the trained module (before any pruning) that fire on none
    of the held-out tokens; pruned_frac: features dropped after training (anthropic2024's decoder norm < 0.99);
    dead_or_pruned_frac: what evaluate() saw of the dictionary as delivered (its silent features plus the pruned)."""
    trained, kept = record["d_dict_trained"], record["d_dict_kept"]
    alive = round(stats.frac_alive * kept)
    return {"preset": spec.preset, "option": spec.option, "knob": spec.knob, "value": spec.value,
            "l0": stats.l0, "mse": stats.mse, "fvu": stats.fvu, "loss_recovered": stats.frac_loss_recovered,
            "kl": stats.kl, "dead_frac": record["never_fired"] / trained, "pruned_frac": (trained - kept) / trained,
            "dead_or_pruned_frac": 1 - alive / trained, "d_dict": trained, "tokens": tokens,
            "steps": record["steps"], "seconds": round(record["seconds"], 2), "ce_clean": stats.ce_clean,
            "ce_spliced": stats.ce_spliced, "ce_zero": stats.ce_zero, "train_dead_frac": record["train_dead_frac"],
            "scaling": record["notes"]}


# ---- the whole benchmark --------------------------------------------------------------------------------------
def choose_threads(settings: Settings) -> int:
    """torch's CPU threads: --threads if given; else one when the machine's 1-minute load already exceeds its
    cores (OpenMP threads spin-wait on oversubscribed cores: one thread measured 4.5x faster than two on a
    shared two-core machine at load 9), else torch's default."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    elif settings.device == "cpu" and os.getloadavg()[0] >= (os.cpu_count() or 1):
        torch.set_num_threads(1)
    return torch.get_num_threads()


def train_all(specs: list[RunSpec], acts: torch.Tensor, held: torch.Tensor,
              settings: Settings) -> tuple[list, list[dict]]:
    """Every run on the same activations, printing each as it ends."""
    modules, records = [], []
    for i, spec in enumerate(specs):
        module, record = train_one(spec, acts, held, settings)
        modules.append(module)
        records.append(record)
        say(f"  [{i + 1}/{len(specs)}] {spec.label} {spec.knob}={spec.value:g}: {record['seconds']:.1f} s, "
            f"last-step L0 {record['train_l0']:.1f}")
    return modules, records


def run_benchmark(settings: Settings, standin: StandIn | None = None) -> tuple[list[dict], list[dict], dict]:
    """All phases; returns (rows, claims, meta) and writes them with the plot into settings.out."""
    from benchmarks.recipes_claims import check_claims, summary

    phases: dict[str, float] = {}
    threads = choose_threads(settings)
    load = os.getloadavg()
    say(f"recipes: torch {torch.__version__} on {settings.device}, {threads} thread(s) of {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} (timings on a shared machine are noisy)")
    tick = time.perf_counter()
    standin = standin or load_standin(settings)
    phases["pretrain" if standin.info.get("pretrained_now") else "stand-in (cached)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    check = ablation_check(standin, settings)
    phases["stand-in check"] = time.perf_counter() - tick
    say(f"stand-in: {standin.info.get('folder', 'given')}; held-out CE {check['ce_clean']:.3f}, "
        f"+CE with each layer's MLP output zeroed: {check['ce_increase']}")
    tick = time.perf_counter()
    acts, held = harvest(standin, settings), held_out_rows(standin, settings)
    phases["harvest"] = time.perf_counter() - tick
    steps = max(1, settings.tokens // settings.batch_size)
    specs = run_specs(settings.presets, settings.knobs, steps, options=settings.options, grids=settings.grids)
    say(f"harvested {tuple(acts.shape)} at {hook_point(settings.layer).module}; training {len(specs)} "
        f"dictionaries of {settings.expansion * acts.shape[1]} features, {steps} steps of {settings.batch_size}"
        + (f" ({steps * settings.batch_size / len(acts):.2f} passes: the text holds no more)"
           if len(acts) < settings.tokens else ""))
    tick = time.perf_counter()
    modules, records = train_all(specs, acts, held, settings)
    phases["train"] = time.perf_counter() - tick
    tick = time.perf_counter()
    stats = evaluate_all(standin, modules, settings)
    phases["eval"] = time.perf_counter() - tick
    rows = [make_row(spec, s, rec, steps * settings.batch_size) for spec, s, rec in zip(specs, stats, records)]
    claims = check_claims(rows)
    meta = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()},
            "machine": {"torch": torch.__version__, "threads": threads, "cores": os.cpu_count(),
                        "load_average_start": load, "load_average_end": os.getloadavg()},
            "stand_in": {**standin.info, "check": check}, "hook": hook_point(settings.layer).module,
            "phases_s": phases}
    write_outputs(settings.out, rows, claims, meta)
    phases["total"] = sum(phases.values())
    say("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    for claim in claims:
        say(summary(claim))
    return rows, claims, meta


def write_outputs(out: Path, rows: list[dict], claims: list[dict], meta: dict) -> None:
    """recipes.json (meta and one row per run), claims.json and recipes_pareto.png, into `out`."""
    from benchmarks.recipes_claims import MATCHING, plot_pareto

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (out / "claims.json").write_text(json.dumps({"matching": MATCHING, "stand_in_check": meta["stand_in"]["check"],
                                                 "claims": claims}, indent=1))
    plot_pareto(rows, out / "recipes_pareto.png",
                f"{len(rows)} dictionaries on the stand-in's {meta['hook']}, {rows[0]['tokens']:,} tokens each, "
                "evaluated on held-out text")
    say(f"wrote {out / 'recipes.json'}, {out / 'claims.json'}, {out / 'recipes_pareto.png'}")


TABLE_COLUMNS = ("preset", "option", "knob", "value", "l0", "mse", "fvu", "loss_recovered", "kl", "dead_frac",
                 "pruned_frac", "tokens", "seconds")


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows as `python -m benchmarks` shows them (the scaling notes are in recipes.json)."""
    return [{c: r[c] for c in TABLE_COLUMNS} for r in rows]


def run() -> list[dict]:
    """`python -m benchmarks recipes`: the default budget, written into bench-out/recipes."""
    rows, _, _ = run_benchmark(Settings(progress=False))
    return table_rows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_recipes", description=__doc__.split("\n")[0])
    d = Settings()
    parser.add_argument("--out", type=Path, default=d.out)
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--tokens", type=int, default=d.tokens, help="activations each dictionary trains on")
    parser.add_argument("--batch", type=int, default=d.batch_size)
    parser.add_argument("--expansion", type=int, default=d.expansion)
    parser.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    parser.add_argument("--layer", type=int, default=d.layer)
    parser.add_argument("--lr-factor", type=float, default=d.lr_factor,
                        help="factor on every preset's lr (chosen at the default 512 steps; lower it for long runs)")
    parser.add_argument("--presets", default=",".join(d.presets))
    parser.add_argument("--knobs", type=int, default=d.knobs, help="knob values per preset (1-3)")
    parser.add_argument("--no-options", action="store_true", help="skip the option runs of the dead-feature claims")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the stand-in is cached "
                        "(default <HF_HOME>/dictionaries/standin)")
    a = parser.parse_args(argv)
    settings = Settings(out=a.out, device=a.device, tokens=a.tokens, batch_size=a.batch, expansion=a.expansion,
                        eval_tokens=a.eval_tokens, layer=a.layer, lr_factor=a.lr_factor,
                        presets=tuple(a.presets.split(",")), knobs=a.knobs, options=not a.no_options,
                        threads=a.threads, seed=a.seed, cache_dir=a.cache_dir, progress=sys.stderr.isatty())
    rows, _, _ = run_benchmark(settings)
    from rich.console import Console

    from benchmarks.__main__ import render

    Console(width=200).print(render("recipes", table_rows(rows), sum(r["seconds"] for r in rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
