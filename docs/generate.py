"""The blocks of the docs that are made from the code or from a recorded run, between
``<!-- generated: NAME -->`` and ``<!-- /generated -->``. ``tests/test_docs.py`` checks that every
such block equals what this script makes, so none can drift.

    python docs/generate.py                      rewrite the generated blocks of README.md and docs/*.md
    python docs/generate.py --sample results     first record a quick-start run's summary.json and plot.png
                                                 as the README's sample (docs/sample/)

Blocks: ``sample-table`` (the README's table, from docs/sample/summary.json, formatted as the
report's landing page formats it), ``loss-types`` (the loss registry), ``code-map`` (the package's
layers as tests/test_architecture.py states them, each module with the first sentence of its
docstring), ``example-cost`` (the model work of the 1.5B example config, entropy_probe/cost.py).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "docs" / "sample"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def sample_table() -> str:
    from entropy_probe import report_page

    rows = json.loads((SAMPLE / "summary.json").read_text())["rows"]
    return _table(list(report_page.COLUMNS), [report_page.summary_cells(row) for row in rows])


def loss_types() -> str:
    from entropy_probe import losses

    return _table(["name (aliases)", "objective"],
                  [[" = ".join(f"`{name}`" for name in names.split(" = ")), formula]
                   for names, formula in losses.describe_loss_types()])


def first_sentence(path: Path) -> str:
    """The module docstring's first sentence, without its references to the design notes."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split("\n\n", 1)[0].split())
    text = re.sub(r' \(DESIGN §[^")]*(?:"[^"]*"[^")]*)*\)', "", text)
    depth = 0
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if (depth == 0 and char in ".:;" and (i + 1 == len(text) or text[i + 1] == " ")
                and not re.search(r"(\bal|e\.g|i\.e|\bvs)$", text[:i])):
            text = text[:i]
            break
    return text.replace("|", "\\|")


def code_map() -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from test_architecture import LAYER_NOTES, LAYERS

    package = REPO / "entropy_probe"
    out = []
    for layer, modules in LAYERS.items():
        rows = []
        for module in sorted(modules):
            parts = module.split(".")
            path = package.joinpath(*parts).with_suffix(".py")
            if not path.exists():
                path = package.joinpath(*parts, "__init__.py")
            rows.append([f"`{path.relative_to(REPO)}`", first_sentence(path)])
        out.append(f"**{layer}** — {LAYER_NOTES[layer]}\n\n" + _table(["module", "what it is"], rows))
    return "\n".join(out)


def example_cost() -> str:
    """The model work of config/examples/qwen2.5-1.5b-lora-gsm8k.yaml, counted from the config."""
    import yaml

    from entropy_probe import config_schema, cost

    config = yaml.safe_load((REPO / "config" / "examples" / "qwen2.5-1.5b-lora-gsm8k.yaml").read_text())
    # what each update variant adds: the README's two, one with its ΔH measured (snis: true)
    config["update"]["variants"] = {"dapo": {"loss_type": "dapo", "snis": True},
                                    "adamw": {"optimizer": "adamw", "lr_factor": 0.02}}
    config_schema.fill_defaults(config)
    rows = cost.model_work(config)
    count = lambda n: "—" if not n else f"{n:,}"  # noqa: E731
    cells = [[r.stage, f"{r.jobs}", f"{r.sequences:,}", count(r.generated), count(r.forward), count(r.backward),
              r.passes] for r in rows]
    return _table(["stage", "jobs", "sequences", "tokens generated", "tokens forward", "tokens backward",
                   "passes over the sequences"], cells)


GENERATORS = {"sample-table": sample_table, "loss-types": loss_types, "code-map": code_map, "example-cost": example_cost}


def regenerate(text: str) -> str:
    """``text`` with every generated block made anew (an unknown block name is an error)."""
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise KeyError(f"unknown generated block {name!r} (known: {', '.join(GENERATORS)})")
        return match.group(1) + GENERATORS[name]() + match.group(4)

    return BLOCK.sub(fill, text)


def record_sample(results: Path) -> None:
    SAMPLE.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "plot.png"):
        shutil.copy(results / name, SAMPLE / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, help="a quick-start run's results/ to record as the README's sample")
    args = parser.parse_args()
    if args.sample:
        record_sample(args.sample)
    for path in DOCUMENTS:
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
