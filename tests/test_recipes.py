"""Every command block the README and docs/ show runs verbatim, from a fresh copy of the
repository's files, as a user would copy it (docs/development.md, "The docs are tested"):

- ``default-run`` blocks, in the directory where the README's quick start ran;
- ``full`` and ``dry`` blocks in a second fresh copy where tests/standins.py created what the
  recipes name by hub id or trainer run (the embedded policy as ``Qwen/Qwen2.5-1.5B-Instruct``, a
  GSM8K-shaped dataset repository as ``openai/gsm8k``, a real two-step TRL GRPOTrainer run as
  ``trl_out/``), in document order (a later block may use a file an earlier one made); ``full``
  as written (the TRL trajectory runs whole), ``dry`` with ``-n`` added to each snakemake command;
- ``setup`` blocks (the README's install commands) are run by .ci/run in a fresh virtual
  environment, ``cluster`` blocks by ci/slurm/run.sh.

Then what the docs say of a run's files and of the README's sample is held against these runs.
"""
from __future__ import annotations

import json
import re

import pytest
from test_docs import DOCUMENTS, FENCE, bash_blocks, code_spans

from workflow_util import fresh_copy, run_in

pytestmark = pytest.mark.workflow

README = DOCUMENTS[0]


def dry(commands: str) -> str:
    """``commands`` with ``-n`` added to every snakemake command that lacks it."""
    out = []
    for line in commands.splitlines():
        code, hash_, comment = line.partition(" #")
        if re.match(r"\s*snakemake\b", code) and not re.search(r"\s-n\b", code):
            code = code.rstrip() + " -n"
        out.append(code + (hash_ + comment if hash_ else ""))
    return "\n".join(out)


def recipes(kinds: tuple[str, ...], documents=DOCUMENTS) -> list[tuple[str, str]]:
    """(document name, script) of every block of ``kinds``, in document order."""
    return [(path.name, dry(commands) if kind == "dry" else commands)
            for path in documents for kind, commands in bash_blocks(path) if kind in kinds]


@pytest.fixture(scope="module")
def standin_copy(toy_policy_dir, tmp_path_factory):
    """A fresh copy of the repository with the stand-ins, where the README's ``full`` and ``dry``
    recipes (the TRL run probed whole) then ran; every other document's run afterwards."""
    import standins

    work = fresh_copy(tmp_path_factory.mktemp("recipes"))
    standins.make_all(work, toy_policy_dir)
    for _, script in recipes(("full", "dry"), [README]):
        run_in(work, script, timeout=2400)
    return work


def test_the_readme_recipes_ran(standin_copy):
    """"Probe a TRL run", copied from the README: one row per step of the stand-in run, its
    numbers finite, the report over training written."""
    import math

    trajectory = json.loads((standin_copy / "results" / "trajectory.json").read_text())
    assert len(trajectory["rows"]) == 1  # two checkpoints: one step
    row = trajectory["rows"][0]
    assert all(math.isfinite(row[key]) for key in ("H", "delta_h1", "delta_h", "delta_h_sampler"))
    assert (standin_copy / "results" / "trajectory.png").stat().st_size > 0


@pytest.mark.parametrize("name", [p.name for p in DOCUMENTS[1:] if recipes(("full", "dry"), [p])])
def test_the_recipes_of_each_document_run(standin_copy, name):
    for _, script in recipes(("full", "dry"), [p for p in DOCUMENTS if p.name == name]):
        run_in(standin_copy, script)


@pytest.mark.parametrize("name", [p.name for p in DOCUMENTS if recipes(("default-run",), [p])])
def test_the_recipes_after_the_quick_start_run(quickstart_run, name):
    for _, script in recipes(("default-run",), [p for p in DOCUMENTS if p.name == name]):
        run_in(quickstart_run, script)


def _results_named() -> list[str]:
    """Every path under results/ the docs name: code spans, and the tree of docs/outputs.md."""
    named = [span.split()[0] for path in DOCUMENTS for span in code_spans(path.read_text())
             if span.startswith("results/")]
    tree = next(m.group(3) for m in FENCE.finditer((DOCUMENTS[0].parent / "docs" / "outputs.md").read_text())
                if m.group(3).startswith("results/\n"))
    for line in tree.splitlines()[1:]:
        if re.match(r"  \S", line):
            entry = re.split(r"\s{2,}", line.strip())[0]
            previous = ""
            for name in entry.split(", "):
                name = re.sub(r"^(.*)\.\w+$", r"\1", previous) + name if name.startswith(".") else name
                named.append(f"results/{name}")
                previous = name
    return named


def _glob_of(path: str) -> str:
    return re.sub(r"\{[^}]*\}|<[^>]*>", "*", path).rstrip("/")


def test_every_result_the_docs_name_is_written(quickstart_run, standin_copy, default_run):
    """Each results/ path of the docs is written by the quick start, the stand-in recipes (a
    trainer's run: per step under results/pairs/<pair>/) or the suite's default run (variants)."""
    roots = [quickstart_run, standin_copy, default_run]
    missing = []
    for path in sorted(set(_results_named())):
        pattern = _glob_of(path)
        inner = pattern.removeprefix("results/")
        found = any(list(root.glob(pattern)) or list(root.glob(f"results/pairs/*/{inner}")) for root in roots)
        if not found:
            missing.append(path)
    assert not missing, missing


def test_the_readme_sample_is_the_quick_start(quickstart_run):
    """docs/sample/summary.json (the README's table, generated from it) is a quick-start run: the
    same config, and every number within two standard errors of this run's (equal on the machine
    that recorded it; the tiny policy's training may round differently elsewhere)."""
    sample = json.loads((README.parent / "docs" / "sample" / "summary.json").read_text())
    run = json.loads((quickstart_run / "results" / "summary.json").read_text())
    assert sample["config"] == run["config"]
    pairs = {"delta_h1": "delta_h1_se_total", "delta_h": "delta_h_se", "delta_h_sampler": "delta_h_sampler_se",
             "exact_delta_h": "delta_h_se", "exact_delta_h_sampler": "delta_h_sampler_se"}
    assert [r["eta"] for r in sample["rows"]] == [r["eta"] for r in run["rows"]]
    for ours, theirs in zip(sample["rows"], run["rows"]):
        for key, se in pairs.items():
            assert abs(ours[key] - theirs[key]) <= 2 * theirs[se], (ours["eta"], key, ours[key], theirs[key])


def test_the_readme_plot_is_the_quick_starts():
    from PIL import Image

    plot = README.parent / "docs" / "sample" / "plot.png"
    assert "](docs/sample/plot.png)" in README.read_text()
    with Image.open(plot) as image:
        assert image.width > 600 and image.height > 300


def test_dry_adds_n_to_snakemake_commands_only():
    script = "cp a b\nsnakemake --cores 4 --configfile x.yaml   # go\nsnakemake -n --cores 1\npython -m x"
    assert dry(script).splitlines() == ["cp a b", "snakemake --cores 4 --configfile x.yaml -n # go",
                                        "snakemake -n --cores 1", "python -m x"]


def test_every_runnable_recipe_is_collected():
    kinds = {kind for path in DOCUMENTS for kind, _ in bash_blocks(path)}
    assert {"setup", "default-run", "full", "dry"} <= kinds
    assert any("--configfile my-run.yaml" in script for _, script in recipes(("full",), [README]))


def test_the_standins_stand_where_the_recipes_look(standin_copy):
    """The substitution is by path: each hub id a recipe names is a local directory of that name."""
    import standins

    for name in (standins.MODEL, standins.DATASET, standins.TRL_RUN, standins.CHECKPOINT):
        assert (standin_copy / name).is_dir(), name
    text = "\n".join(p.read_text() for p in DOCUMENTS)
    text += (README.parent / "config" / "examples" / "qwen2.5-1.5b-lora-gsm8k.yaml").read_text()
    for name in (standins.MODEL, standins.DATASET, standins.CHECKPOINT):
        assert name in text, name
