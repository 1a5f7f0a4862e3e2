"""Bad inputs fail before any real work, each with one line naming the key or the file, and leave
nothing half-written under results/.

One table: every case is a config (the default one, made tiny, on a local checkpoint and a local
jsonl file, plus the case's overrides) run through Snakemake's default target. Config mistakes
fail while the Snakefile is parsed ("Invalid config: <key>: ...", no results/ at all), a trainer
checkpoint's optimizer state that does not fit its model when the run starts, before any job
("ERROR: <file>: ...", no results/ either: workflow/rules/checkpoint.smk); bad rows,
tokenizers and rewards fail in the first cheap stage that reads them (prepare_data, rollout) with
"ERROR: <message>" on the console and in the rule's log, no traceback, and no output of the failed
job. The cases run concurrently (a few Snakemake processes at once), started when the first test
of the table asks for its result; only the selected cases run (``-k`` works). The config mistakes
are checked by the package's own config check (what the Snakefile calls while it parses), and a
few of them, one per kind of check, also through Snakemake: the same line, nothing written.
"""
from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from workflow_util import REPO, run_snakemake

from entropy_probe.errors import ProbeError

WORKERS = 3  # Snakemake processes at once (each mostly starts Python and imports)
# the failing stage, last first: the runs that take longest
STAGE_ORDER = ["summary", "u_objective", "rollout", "prepare_data", None]


@dataclass
class Case:
    id: str
    overrides: dict  # config section -> keys; "{inp}" in a string is the inputs directory
    expect: str  # regex one console line must match (the key or the file named)
    stage: str | None = None  # None: the config check at parse time; else the rule that fails
    absent: list[str] = field(default_factory=list)  # globs under results/ that must not exist
    succeeds: bool = False  # not an error: the run finishes and results/summary.txt has a line matching expect

    @property
    def in_process(self) -> bool:
        """A config mistake checked by the package's config check alone (entropy_probe.config)."""
        return self.stage is None and self.expect.startswith("Invalid config") and self.id not in THROUGH_SNAKEMAKE


# config mistakes that also run through Snakemake: the schema, a cross-key check, a file check
THROUGH_SNAKEMAKE = {"schema_type", "unknown_top_level_key", "E_total_sequences_below_G", "model_dir_missing",
                     "reward_module_not_importable", "eta_nan"}
ADAMW = {"optimizer": "adamw"}
TRAINER = {"name_or_path": "embedded"}  # model.checkpoint: a full-model checkpoint is the policy itself
CUSTOM = {"name": "custom"}
CASES = [
    # ---------------------------------------------------------------- schema (types, ranges, keys)
    Case("schema_type", {"batch_config": {"G": "two"}},
         r"Invalid config: batch_config\.G: 'two' is not of type 'integer'"),
    Case("schema_range", {"generation": {"top_p": 1.5}},
         r"Invalid config: generation\.top_p: 1\.5 is greater than the maximum of 1"),
    Case("unknown_top_level_key", {"bogus_section": {"x": 1}},
         r"Invalid config: \(top level\): Additional properties are not allowed \('bogus_section' was unexpected\)"),
    Case("unknown_nested_key", {"generation": {"bogus_key": 1}},
         r"Invalid config: generation: Additional properties are not allowed \('bogus_key' was unexpected\)"),
    Case("unknown_entropy", {"estimator": {"entropy": "shannon"}},
         r"Invalid config: estimator\.entropy: 'shannon' is not one of \['sampler', 'tempered_full'\]"),
    Case("fresh_etas_not_a_list", {"estimator": {"fresh_etas": "all"}},
         r"Invalid config: estimator\.fresh_etas: 'all' is not of type 'array', 'null'"),
    Case("eta_nan", {"estimator": {"eta_list": [1e-4, float("nan")]}},  # YAML .nan
         r"Invalid config: estimator\.eta_list\.1: nan is not a finite number"),
    Case("eta_inf", {"estimator": {"eta_list": [float("-inf")]}},  # YAML -.inf
         r"Invalid config: estimator\.eta_list\.0: -inf is not a finite number"),
    # ------------------------------------------------------------------------ inconsistent sizes
    Case("E_total_sequences_below_G", {"batch_config": {"E_total_sequences": 2, "G": 4}},
         r"Invalid config: batch_config\.E_total_sequences: 2 is smaller than batch_config\.G = 4"),
    Case("B_U_above_dataset_size", {"batch_config": {"B_U": 10}},
         r"Invalid config: batch_config\.B_U: 10 distinct prompts > dataset size 9"),
    Case("E_num_shards_above_prompts", {"batch_config": {"E_num_shards": 3}},
         r"Invalid config: batch_config\.E_num_shards: 3 shards > 2 E prompts"),
    # ------------------------------------------------------------------- model, adapter, optimizer
    Case("model_dir_missing", {"model": {"name_or_path": "{inp}/no_such_checkpoint"}},
         r"Invalid config: model\.name_or_path: '[^']*/no_such_checkpoint' is not an existing directory"),
    Case("model_path_is_a_file", {"model": {"name_or_path": "{inp}/prompts.jsonl"}},
         r"Invalid config: model\.name_or_path: '[^']*/prompts\.jsonl' is a file"),
    Case("adapter_dir_missing", {"model": {"adapter_path": "{inp}/no_such_adapter"}},
         r"Invalid config: model\.adapter_path: '[^']*/no_such_adapter' is not an existing directory"),
    Case("adapter_without_config", {"model": {"adapter_path": "{inp}/adapter_without_config"}},
         r"Invalid config: model\.adapter_path: '[^']*/adapter_without_config' has no adapter_config\.json"),
    Case("optimizer_state_missing", {"update": ADAMW | {"optimizer_state": "{inp}/no_such_optimizer.pt"}},
         r"Invalid config: update\.optimizer_state: '[^']*/no_such_optimizer\.pt' does not exist"),
    Case("optimizer_state_corrupt", {"update": ADAMW | {"optimizer_state": "{inp}/corrupt/optimizer.pt"}},
         r"Invalid config: update\.optimizer_state: '[^']*/corrupt/optimizer\.pt' is not a torch\.save file"),
    Case("optimizer_names_missing", {"update": ADAMW | {"optimizer_state": "{inp}/unnamed/optimizer.pt"}},
         r"Invalid config: update\.optimizer_param_names: '[^']*/unnamed/optimizer_param_names\.json' does not "
         r"exist \(the default"),
    # ---------------------------------------- trainer checkpoints (checked before any job: nothing written)
    Case("checkpoint_state_of_another_model",
         {"model": TRAINER | {"checkpoint": "{inp}/trainer_other/checkpoint-2"}, "update": ADAMW},
         r"^ERROR: [^ ]*/trainer_other/checkpoint-2/optimizer\.pt: state tensor 0 \(param group 0, position 0\) has "
         r"shape \(14, 32\), but the Trainer's order puts 'model\.embed_tokens\.weight' of shape \(14, 48\) there"),
    Case("checkpoint_trained_with_a_frozen_parameter",
         {"model": TRAINER | {"checkpoint": "{inp}/trainer_frozen/checkpoint-2"}, "update": ADAMW},
         r"^ERROR: [^ ]*/trainer_frozen/checkpoint-2/optimizer\.pt: state tensor 0 \(param group 0, position 0\) has "
         r"shape \(48, 48\), but the Trainer's order puts 'model\.embed_tokens\.weight' of shape \(14, 48\) there"),
    Case("next_checkpoint_of_another_model",
         {"model": TRAINER | {"checkpoint": "{inp}/trainer_frozen/checkpoint-2"},
          "update": {"optimizer": "checkpoint_diff", "next_checkpoint": "{inp}/trainer_other/checkpoint-3"}},
         r"Invalid config: update\.next_checkpoint: does not fit model\.checkpoint: tensor 'lm_head\.weight' "
         r"has shape \(14, 32\) in [^ ]*/trainer_other/checkpoint-3, \(14, 48\) in [^ ]*/trainer_frozen/checkpoint-2"),
    # ------------------------------------------------------------------------------------ dataset
    Case("dataset_missing", {"data": {"source": "{inp}/no_such_prompts.jsonl"}},
         r"Invalid config: data\.source: '[^']*/no_such_prompts\.jsonl' does not exist"),
    Case("dataset_without_prompt_field", {"data": {"source": "{inp}/no_prompt_field.jsonl"}},
         r"^ERROR: data\.source '[^']*/no_prompt_field\.jsonl', split 'train', row 0: field 'prompt' "
         r"\(data\.prompt_field\) is missing or empty", "prepare_data", ["data/*"]),
    Case("dataset_without_answer_field", {"data": {"source": "{inp}/no_answer_field.jsonl"}},
         r"^ERROR: data\.source '[^']*/no_answer_field\.jsonl', split 'train', row 0: field 'answer' "
         r"\(data\.answer_field\) is missing, null or empty", "prepare_data", ["data/*"]),
    Case("empty_prompt", {"data": {"source": "{inp}/empty_prompt.jsonl"}},
         r"^ERROR: data\.source '[^']*/empty_prompt\.jsonl', split 'train', row 4: field 'prompt' "
         r"\(data\.prompt_field\) is missing or empty", "prepare_data", ["data/*"]),
    Case("prompts_longer_than_context", {"data": {"max_prompt_tokens": 3}},
         r"^ERROR: split 'train': no prompt left \(all 9 rows dropped by data\.max_prompt_tokens = 3\)",
         "prepare_data", ["data/*"]),
    # ---------------------------------------------------------------------------------- tokenizer
    Case("tokenizer_without_eos", {"model": {"name_or_path": "{inp}/checkpoint_without_eos"}},
         r"^ERROR: [^ ]*/checkpoint_without_eos: the tokenizer defines no EOS token", "prepare_data", ["data/*"]),
    # ------------------------------------------------------------------------------------- reward
    Case("reward_module_not_importable", {"reward": CUSTOM | {"function": "no_such_reward_module:score"}},
         r"Invalid config: reward\.function: module 'no_such_reward_module' not found"),
    Case("reward_file_missing", {"reward": CUSTOM | {"function": "{inp}/no_such_rewards.py:score"}},
         r"Invalid config: reward\.function: file '[^']*/no_such_rewards\.py' does not exist"),
    Case("reward_function_missing", {"reward": CUSTOM | {"function": "{inp}/rewards.py:no_such_function"}},
         r"Invalid config: reward\.function: '[^']*/rewards\.py' defines no 'no_such_function'"),
    Case("reward_raises", {"reward": CUSTOM | {"function": "{inp}/rewards.py:raises"}},
         r"^ERROR: reward\.function '[^']*/rewards\.py:raises' raised ValueError: cannot grade '.*' \(prompt "
         r"'\d\+\d=', response '.*', gold answer '\d+'\)", "rollout", ["rollouts/*/*"]),

    # ----------------------------------------------- a U batch without signal (a reward that is always 0)
    Case("no_signal_with_sgd", {"reward": CUSTOM | {"function": "{inp}/rewards.py:zero"}},
         r"^ERROR: no prompt group of the U batch \(2 groups of G = 2\) has a non-zero advantage .* stopped before "
         r"teacher forcing\. Raise batch_config\.B_U or G", "u_objective", ["teacher_force", "gradients", "estimates/u_*"]),
    Case("no_signal_with_adamw", {"reward": CUSTOM | {"function": "{inp}/rewards.py:zero"}, "update": ADAMW},
         r"^NOTE: no prompt group of the U batch has a non-zero advantage: v carries no gradient from this batch",
         succeeds=True),
]

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]  # 9 rows, 4 tokens each
REWARDS = '''
def raises(response, gold):
    raise ValueError(f"cannot grade {response!r}")


def zero(response, gold):
    return 0.0
'''


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint (the embedded architecture: nothing here needs a trained one),
    a copy whose tokenizer has no EOS, prompt files (good, and one per defect), a reward file,
    optimizer states (corrupt, and one without its names file) and an adapter dir without its config."""
    import torch

    from entropy_probe.toy import build_model, build_tokenizer

    inp = tmp_path_factory.mktemp("bad_inputs")
    build_model(0).save_pretrained(inp / "checkpoint")
    build_tokenizer().save_pretrained(inp / "checkpoint")
    shutil.copytree(inp / "checkpoint", inp / "checkpoint_without_eos")
    tokenizer_config = inp / "checkpoint_without_eos" / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    del settings["eos_token"]
    tokenizer_config.write_text(json.dumps(settings))

    _write_jsonl(inp / "prompts.jsonl", ROWS)
    _write_jsonl(inp / "no_prompt_field.jsonl", [{"question": r["prompt"], "answer": r["answer"]} for r in ROWS])
    _write_jsonl(inp / "no_answer_field.jsonl", [{"prompt": r["prompt"], "solution": r["answer"]} for r in ROWS])
    _write_jsonl(inp / "empty_prompt.jsonl", ROWS[:4] + [{"prompt": "", "answer": "0"}] + ROWS[4:])
    (inp / "rewards.py").write_text(REWARDS)

    (inp / "corrupt").mkdir()
    (inp / "corrupt" / "optimizer.pt").write_bytes(b"this is not a torch.save file\n" * 20)
    (inp / "corrupt" / "optimizer_param_names.json").write_text("[]")
    (inp / "unnamed").mkdir()
    torch.save({"state": {}, "param_groups": []}, inp / "unnamed" / "optimizer.pt")
    _trainer_checkpoint(inp / "checkpoint", inp / "trainer_other" / "checkpoint-2", hidden_size=32)
    _trainer_checkpoint(inp / "checkpoint", inp / "trainer_frozen" / "checkpoint-2", frozen="model.embed_tokens.weight")
    shutil.copytree(inp / "trainer_other" / "checkpoint-2", inp / "trainer_other" / "checkpoint-3")
    build_model(1, hidden_size=32).save_pretrained(inp / "trainer_other" / "checkpoint-3")
    (inp / "adapter_without_config").mkdir()
    (inp / "adapter_without_config" / "adapter_model.safetensors").write_bytes(b"")
    return inp


def _trainer_checkpoint(model_dir: Path, out: Path, hidden_size: int = 48, frozen: str = "") -> None:
    """A Trainer checkpoint directory: the model of ``model_dir`` with an optimizer.pt in the
    Trainer's grouping, of a toy model with ``hidden_size`` trained with ``frozen`` frozen."""
    import torch
    from trl_harness import toy_trainer_state

    shutil.copytree(model_dir, out)
    torch.save(toy_trainer_state(hidden_size, (frozen,) if frozen else ()), out / "optimizer.pt")


def _config(case: Case, inp: Path) -> dict:
    """The default config made tiny (2 E prompts x G = 2, B_U = 2, two new tokens, no fresh
    rollouts or update variants) on the local checkpoint and prompt file, with the case's
    overrides."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["model"].update(name_or_path=str(inp / "checkpoint"), device="cpu")
    config["data"]["source"] = str(inp / "prompts.jsonl")
    config["batch_config"].update(E_total_sequences=4, G=2, B_U=2, E_num_shards=1, U_num_shards=1)
    config["generation"].update(max_new_tokens=2, gen_batch_size=4, rollout_batch_size=2)
    config["teacher_forcing"].update(batch_size=4)
    config["estimator"].update(eta_list=[1e-3], fresh_etas=[])  # no fresh rollouts, no update variants:
    config["update"]["variants"] = {}  # the checks stop the run before them, or a full run is not the point
    for section, values in case.overrides.items():
        values = {k: v.replace("{inp}", str(inp)) if isinstance(v, str) else v for k, v in values.items()}
        config.setdefault(section, {}).update(values)
    return config


def _run(case: Case, inp: Path, work: Path):
    (work / "config.yaml").write_text(yaml.safe_dump(_config(case, inp)))
    return run_snakemake(work, "config.yaml", "--cores", "1", check=False, timeout=600)


@pytest.fixture(scope="module")
def outcomes(request, inputs, tmp_path_factory):
    """Case id -> (workdir, future of its Snakemake run), for the cases this session selected."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    works = {case.id: tmp_path_factory.mktemp(case.id) for case in CASES if case.id in selected and not case.in_process}
    pool = ThreadPoolExecutor(WORKERS)
    longest_first = sorted(CASES, key=lambda c: STAGE_ORDER.index("summary" if c.succeeds else c.stage))  # the runs that reach jobs first
    futures = {case.id: (works[case.id], pool.submit(_run, case, inputs, works[case.id]))
               for case in longest_first if case.id in works}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _check_complete(path: Path) -> None:
    """A file under results/ is whole: no temporary name (shards.atomic_path writes
    .<name>.<random>.tmp<suffix> and renames it), and JSON, jsonl and safetensors files load."""
    assert not (path.name.startswith(".") or ".tmp" in path.name), f"temporary file left: {path}"
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            json.loads(line)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)


@pytest.mark.workflow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_line_and_no_partial_output(case, outcomes, inputs):
    if case.in_process:  # the check the Snakefile runs while it parses, and its one line
        from entropy_probe.config import ConfigError, validated

        with pytest.raises(ConfigError) as info:
            validated(_config(case, inputs))
        line = f"Invalid config: {info.value}"
        assert "\n" not in line and re.search(case.expect, line), line
        return
    work, future = outcomes[case.id]
    result = future.result()
    output = result.stdout + "\n" + result.stderr
    context = f"\n--- snakemake output of {case.id} ---\n{output[-5000:]}"
    if case.succeeds:
        assert result.returncode == 0, context
        table = (work / "results" / "summary.txt").read_text().splitlines()
        assert len([line for line in table if re.search(case.expect, line)]) == 1, table
        return
    assert result.returncode != 0, context
    matching = [line for line in output.splitlines() if re.search(case.expect, line)]
    assert len(matching) == 1, f"{len(matching)} lines match {case.expect!r}{context}"
    assert matching[0].startswith("ERROR: ") or matching[0].startswith("Invalid config: "), matching[0]
    assert "Traceback (most recent call last)" not in output, context

    results = work / "results"
    if case.stage is None:  # the config check: before any job, nothing written
        assert not results.exists(), sorted(map(str, results.rglob("*")))
        return
    # the failing stage ran and said the same line in its log, as the last line
    logs = sorted((results / "logs").glob(f"{case.stage}*.log"))
    assert logs, f"no log of rule {case.stage}{context}"
    last_lines = [log.read_text().splitlines()[-1] for log in logs if log.read_text().strip()]
    assert any(re.search(case.expect, line) for line in last_lines), last_lines
    for pattern in case.absent:  # the failed job's outputs are gone (and what it stops)
        assert not list(results.glob(pattern)), sorted(map(str, results.glob(pattern)))
    for path in results.rglob("*"):  # what earlier jobs wrote is whole
        if path.is_file():
            _check_complete(path)


# ------------------------------------------------------------------------ one-line stage errors


def test_input_errors_are_probe_errors_and_keep_their_bases():
    from entropy_probe.config import ConfigError
    from entropy_probe.data import DataError
    from entropy_probe.guards import NonFiniteError
    from entropy_probe.models import PolicyLoadError
    from entropy_probe.optimizer_state import OptimizerStateError
    from entropy_probe.rewards import RewardError
    from entropy_probe.shards import ShardError

    for error, base in [(ConfigError, ValueError), (DataError, ValueError), (PolicyLoadError, RuntimeError),
                        (RewardError, ValueError), (OptimizerStateError, ValueError), (ShardError, RuntimeError),
                        (NonFiniteError, FloatingPointError)]:
        assert issubclass(error, ProbeError) and issubclass(error, base), error


STAGE = """
import sys
from entropy_probe.data import DataError
from entropy_probe.stage import stage_run
with stage_run(sys.argv[1]):
    if sys.argv[2] == "input":
        raise DataError("data.source 'x.jsonl', row 3: field 'prompt' is missing\\n(wrapped library message)")
    raise KeyError("a bug")
"""


@pytest.mark.parametrize("kind", ["input", "bug"])
def test_stage_run_reports_input_errors_as_one_line_and_bugs_with_a_traceback(tmp_path, kind):
    import subprocess
    import sys

    log = tmp_path / "logs" / "stage.log"
    result = subprocess.run([sys.executable, "-c", STAGE, str(log), kind], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 1
    if kind == "input":
        line = "ERROR: data.source 'x.jsonl', row 3: field 'prompt' is missing (wrapped library message)"
        assert result.stderr == line + "\n" and result.stdout == ""
        assert log.read_text() == line + "\n"
    else:
        assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'a bug'" in result.stderr
        assert result.stderr.count("Traceback (most recent call last)") == 1  # printed once
        assert "Traceback (most recent call last)" in log.read_text() and "KeyError: 'a bug'" in log.read_text()
