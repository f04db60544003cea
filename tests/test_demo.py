"""The README's main command, end to end: `run_demo` on a fresh work folder (toy model pretrained here)."""

from __future__ import annotations

import json

import pytest

from dictionaries.demo import run_demo
from dictionaries.errors import InvalidArgumentError
from dictionaries.registry import load_registry

from helpers import chromium_page


@pytest.mark.slow
def test_demo_runs_the_whole_loop_offline(tmp_path, monkeypatch):
    # run_demo points these at its own hub and registry; monkeypatch restores them after the test
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("DICTIONARIES_REGISTRY", str(load_registry().path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the demo must not need it unset beforehand
    lines: list[str] = []
    # a toy model pretrained 100 steps, not the demo's 400 (50 s less): every step of the loop is the same, and
    # CI runs the whole `dictctl demo` after the tests
    result = run_demo(tmp_path, tokens=40_960, say=lines.append, progress=False, pretrain_steps=100)
    text = "\n".join(lines)
    for step in range(1, 9):
        assert f"[{step}/8]" in text
    assert "dictctl train pythia70m/mlp3/8192" in lines[-1]          # ends with the Pythia commands
    card = json.loads((result.folder / "card.json").read_text())
    assert card["stats"]["source"] == "measured"
    assert card["stats"]["l0"] <= 16.0 + 1e-6
    assert 0.0 < card["stats"]["frac_loss_recovered"] <= 1.0
    assert (result.folder / "density.png").stat().st_size > 1000
    registry = load_registry(result.folder.parents[3] / "registry" / "registry.yaml")
    entry = registry.get(result.name)                               # registered, pinned to the local commit
    assert entry.location.kind == "hub"
    assert len(entry.location.revision) == 40
    assert result.top_features
    assert all(peak > 0 for _, peak, _ in result.top_features)
    assert result.dashboard.is_file() and str(result.dashboard) in text
    assert len(list(result.dashboard.parent.glob("data/shard_*.js"))) == 1024 // 256
    _check_dashboard_in_chromium(result.dashboard, tmp_path / "demo-dashboard.png")


def _check_dashboard_in_chromium(index, screenshot):
    """The demo's own dashboard in headless chromium: the strongest feature's view shows shaded contexts."""
    import os
    import shutil

    from training.toymodel import corpus_documents

    errors: list[str] = []
    with chromium_page(errors) as page:
        page.goto(index.as_uri())
        page.click("th[data-key=max]")                                   # strongest feature first
        row = page.locator("tr.row").first
        feature, peak = int(row.get_attribute("data-id")), float(row.locator("td").nth(2).inner_text())
        page.fill("#search", str(feature))
        page.click(f"tr.row[data-id='{feature}'] a")
        page.wait_for_selector("#top-contexts .context")
        contexts = page.eval_on_selector_all("#top-contexts .context", """els => els.map(e => [Number(e.dataset.act),
            Array.from(e.querySelectorAll('.tok')).map(t => t.textContent).join(''),
            getComputedStyle(e.querySelector('.tok.marked')).backgroundColor])""")
        page.screenshot(path=str(screenshot), full_page=True)
    assert errors == []
    assert contexts[0][0] == pytest.approx(peak, rel=1e-2)                 # the table's max is the top context's
    assert contexts[0][2] == "rgb(255, 110, 0)"                           # the maximum is fully shaded
    corpus = " ".join(corpus_documents()).replace("\n", "\u23ce")
    assert all(text.strip() in corpus for _, text, _ in contexts)         # windows of the text the dashboard read
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["DEMO_SCREENSHOT"])


def _dictctl_lines(text: str) -> list[list[str]]:
    """Every `dictctl ...` command in a text, split as a shell would (comments dropped)."""
    import shlex

    return [shlex.split(line.split("#")[0].strip())[1:] for line in text.splitlines()
            if line.strip().startswith("dictctl ")]


def _parse(args: list[str]) -> dict:
    """The parameters `dictctl args` parses to (click's own parser: unknown options and bad types fail)."""
    import typer

    from dictionaries.cli import app

    group = typer.main.get_command(app)
    name, *rest = args
    command = group.get_command(None, name)
    assert command is not None, f"dictctl has no command {name!r}"
    return command.make_context(name, list(rest)).params


def test_every_command_the_demo_prints_parses_and_finds_what_the_one_before_wrote():
    """The printed Pythia commands: each parses, and eval/publish name the folder that train writes."""
    from dictionaries.demo import PYTHIA_COMMANDS

    commands = _dictctl_lines(PYTHIA_COMMANDS)
    assert len(commands) >= 5
    params = {tuple(c[:2]): _parse(c) for c in commands}
    train = params[("train", "pythia70m/mlp3/8192")]
    written = f"{train['out']}/{load_registry().get(train['name']).name}"   # train_entries writes out/<entry name>
    assert params[("eval", written)]["ref"] == written
    assert params[("publish", written)]["folder"] == written


def test_every_command_the_readme_lists_parses():
    """README's command table: each line, options in brackets included, parses with placeholders filled."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [re.split(r"\s{2,}", line)[0] for line in readme.splitlines() if line.startswith("dictctl ")]
    assert len(lines) >= 12
    values = {"N": "100", "I": "3", "L": "3"}  # integer placeholders; other upper-case words are names or paths
    for line in lines:
        line = re.sub(r"\[:\w+\]", "", line)                    # PATH[:input]: the optional suffix
        for variant in _alternatives(line):
            args = shlex.split(variant.replace("[", "").replace("]", ""))[1:]
            _parse([values.get(a, "x") if a.replace("/", "").replace("|", "").isupper() else a for a in args])


def _alternatives(line: str) -> list[str]:
    """`[A | B]` groups expanded: one line per alternative (each parsed on its own); `a|b` without spaces is one
    option's set of values (`--to native|saelens`), parsed as one word."""
    import re

    group = re.search(r"\[([^\[\]]* \| [^\[\]]*)\]", line)
    if group is None:
        return [line]
    return [variant for choice in group.group(1).split(" | ")
            for variant in _alternatives(line[:group.start()] + choice.strip() + line[group.end():])]


@pytest.mark.parametrize("tokens, workdir, words", [(0, "dir", "tokens 0"), (-1, "dir", "tokens -1"),
                                                   (120_000, "file", "a file is there")])
def test_demo_refuses_bad_arguments_before_starting_anything(tmp_path, tokens, workdir, words):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match=words):
        run_demo(tmp_path / workdir, tokens=tokens, say=lambda line: None, progress=False)
    assert not (tmp_path / "dir").exists()  # no hub started, no run folder made
