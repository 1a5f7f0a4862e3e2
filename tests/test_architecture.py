"""The shape of the code a newcomer walks: the package's modules stand in layers and import only
their own layer or a lower one, with no circle and no import hidden in a function; modules stay
small; the rules' scripts are shims of the stage layer, and every rule has its stage, its log and
its benchmark."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "entropy_probe"

# The layers, lowest first. A module imports modules of its own layer or of a lower one.
# docs/development.md shows them (docs/generate.py, with LAYER_NOTES and each module's docstring).
LAYERS = {
    "foundation": {"errors", "input_files", "config_schema", "sweep", "entropies", "job_cost"},
    "configuration": {"stage_keys", "trainer_files", "model_config", "data", "prompts", "reward_config", "losses",
                      "plan", "variants", "trainable", "config", "cost"},
    "mathematics": {"measure", "logit_gradient", "normalization", "estimators", "first_order", "update", "snis",
                    "fresh", "linearity", "attribution", "covariance", "noise", "gradients", "parameters",
                    "precision", "guards"},
    "files and models": {"shards", "rewards", "optimizer_state", "dcp_files", "zero_checkpoint", "verl_checkpoint",
                         "trainer_checkpoint", "models", "checkpoint_step",
                         "update_builder", "toy", "exact", "exact_terms"},
    "passes": {"tf_layout", "attention", "activation_checkpointing", "fused_head", "teacher_force", "generate",
               "stopping", "rollout", "passes", "snis_pass", "fresh_pass", "verify"},
    "reports": {"report", "report_page", "attribution_report", "variant_report", "trajectory_report",
                "shard_report"},
    "stages": {"stage", "stages", "stages.inputs", "stages.policy", "stages.plan", "stages.rollout",
               "stages.teacher_force", "stages.update", "stages.statistics", "stages.fresh", "stages.attribution",
               "stages.variants", "stages.checkpoint", "stages.report", "cli", "__main__"},
}
LAYER_NOTES = {
    "foundation": "names, files and the schema: what everything else builds on (torch-free)",
    "configuration": "the config and what it drives, checked while the Snakefile parses (torch-free)",
    "mathematics": "pure tensor functions: every formula, once (docs/science.md, the formula map)",
    "files and models": "files and models: the one shard reader/writer, policies, checkpoints, optimizer states, ground truth",
    "passes": "the passes of the model over stored or new responses",
    "reports": "what a person reads: tables, plots, the report's landing page",
    "stages": "one function per rule, the adapter that runs it, the command line",
}
RANK = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        if name:
            out[name] = path
    return out


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        return [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("entropy_probe.")]
    if node.level == 0:
        if not (node.module or "").startswith("entropy_probe"):
            return []
        base = node.module.split(".", 1)[1] if "." in node.module else ""
    else:
        package = module.split(".")[:-1] if module != "stages" else ["stages"]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    names = _modules()
    out = []
    for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        out.append(candidate if candidate in names else base)
    return [m for m in out if m]


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> (imported package module, line, inside a function) for every import."""
    graph = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        found += [(m, inner.lineno, True) for m in _resolve(module, inner)]
        local = {line for _, line, _ in found}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.lineno not in local:
                found += [(m, node.lineno, False) for m in _resolve(module, node)]
        graph[module] = found
    return graph


def test_every_module_has_a_layer():
    assert set(_modules()) == set(RANK), (sorted(set(_modules()) - set(RANK)), sorted(set(RANK) - set(_modules())))


def test_no_import_reaches_up_a_layer():
    upward = [(module, target, line) for module, imports in _imports().items() for target, line, _ in imports
              if RANK[target] > RANK[module]]
    assert not upward, upward


def test_no_circle():
    graph = {module: {t for t, _, _ in imports if t != module} for module, imports in _imports().items()}
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail(f"import circle: {' -> '.join(path + [module, target])}")
            if not state.get(target):
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [])


def test_no_package_import_hides_in_a_function_without_saying_why():
    hidden = []
    for module, imports in _imports().items():
        lines = _modules()[module].read_text().splitlines()
        for target, line, local in imports:
            if local and "#" not in lines[line - 1]:
                hidden.append(f"{module}:{line} imports {target}")
    assert not hidden, hidden


def test_modules_stay_small_or_say_why():
    long = []
    for module, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and "Why this module is long:" not in (ast.get_docstring(
                ast.parse(text)) or ""):
            long.append(f"{module}: {len(text.splitlines())} lines")
    assert not long, long


def test_scripts_are_shims_of_the_stage_layer():
    scripts = sorted((REPO / "scripts").glob("*.py"))
    assert [p.name for p in scripts] == ["run_stage.py"]
    code = [line for line in scripts[0].read_text().splitlines() if line.strip() and not line.startswith(('"""', "By"))]
    assert len(code) <= 4 and all("entropy_probe" in line or "run_job" in line for line in code), code


RULES = REPO / "workflow" / "rules"


def _rules() -> dict[str, str]:
    """rule name -> its text, over every .smk file."""
    out = {}
    for path in sorted(RULES.glob("*.smk")):
        text = path.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*rule (\w+):", text, flags=re.M)]
        for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
            out[name] = text[start:end]
    return out


def test_every_job_rule_runs_its_stage_with_a_log_and_a_benchmark():
    from entropy_probe.stages import STAGES

    job_rules = {name: text for name, text in _rules().items() if "script:" in text}
    assert set(job_rules) == set(STAGES), sorted(set(job_rules) ^ set(STAGES))
    for name, text in job_rules.items():
        assert re.search(r"script:\s+STAGE\b", text), name
        assert "log:" in text and "benchmark:" in text, name
    assert not [n for n, t in _rules().items() if re.search(r"^\s*(run|shell):", t, flags=re.M)]
