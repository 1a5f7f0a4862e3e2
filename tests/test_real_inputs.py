"""Real checkpoints and data (docs/real-models.md): a PEFT LoRA adapter with its AdamW state,
GSM8K-style jsonl and parquet prompt files, prompt templates, token-budget filtering, stop strings,
and the config checks of model / data / reward. Everything is built locally from the embedded
policy (no hub access); one Snakemake run (module fixture) goes from the adapter and the files to
results/delta_h1.json (marked ``workflow``: deselect with ``-m "not workflow"``)."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from workflow_util import REPO, run_snakemake

from entropy_probe import data, generate, gradients, stopping, models, prompts, rewards
from entropy_probe.noise import STREAM_E, NoiseKey
from entropy_probe.config import ConfigError, check_config, load_config
from entropy_probe.config_schema import fill_defaults, validate
from entropy_probe.plan import check_against_prepared
from entropy_probe.optimizer_state import OptimizerStateError, load_adamw_state
from entropy_probe.shards import read_json, read_shard, write_json
from entropy_probe.toy import _answer_log_likelihood, _training_batch, arithmetic_examples

LORA_TARGETS = ["q_proj", "v_proj"]
BETAS, EPS, WD, LR, STEPS = (0.8, 0.99), 1e-6, 0.05, 2e-3, 3
MAX_PROMPT_TOKENS = 6  # the long prompts of the jsonl file (7+ tokens) are dropped


def _hash_dir(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _is_adapter_name(name: str) -> bool:
    return name.startswith("base_model.model.") and (".lora_A.default." in name or ".lora_B.default." in name)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def adapter_dir(toy_policy_dir, tmp_path_factory):
    """A LoRA adapter on the embedded policy after a few real AdamW steps (two param groups:
    lora_A with weight decay, lora_B without), saved with peft, plus the optimizer's state_dict
    and the PEFT names of its param groups."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    base = models.load_policy(toy_policy_dir, "float32", "cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, lora_dropout=0.1))
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    groups = [[n for n, _ in named if ".lora_A." in n], [n for n, _ in named if ".lora_B." in n]]
    params = dict(named)
    optimizer = torch.optim.AdamW(
        [{"params": [params[n] for n in groups[0]], "weight_decay": WD},
         {"params": [params[n] for n in groups[1]], "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    ids, attention, answer_mask = _training_batch(models.load_tokenizer(toy_policy_dir), arithmetic_examples(9))
    peft_model.train()
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = -_answer_log_likelihood(peft_model, ids, attention, answer_mask).sum() / answer_mask.sum()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(out)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    (out / "optimizer_param_names.json").write_text(json.dumps(groups))
    return out


def _gsm8k_row(a: int, b: int) -> dict:
    return {"question": f"{a}+{b}=", "answer": f"{a} plus {b} makes {a + b}.\n#### {a + b}"}


LONG = [{"question": "1+2+3+4=", "answer": "#### 10"}, {"question": "10+20+30=", "answer": "#### 60"}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """GSM8K-style files: gsm8k_test.jsonl (30 prompts + 2 too long for the token budget) and
    gsm8k_train.parquet (40 prompts)."""
    import pandas as pd

    out = tmp_path_factory.mktemp("gsm8k")
    test_rows = [_gsm8k_row(a, b) for a in range(10, 13) for b in range(10)]
    test_rows = test_rows[:5] + LONG[:1] + test_rows[5:20] + LONG[1:] + test_rows[20:]
    with open(out / "gsm8k_test.jsonl", "w") as f:
        for row in test_rows:
            f.write(json.dumps(row) + "\n")
    pd.DataFrame([_gsm8k_row(a, b) for a in range(4) for b in range(10)]).to_parquet(out / "gsm8k_train.parquet")
    return out


def _probe_config(toy_policy_dir, adapter_dir, data_dir) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["model"].update(name_or_path=str(toy_policy_dir), adapter_path=str(adapter_dir), device="cpu")
    config["data"].update(source=str(data_dir / "gsm8k_{split}"), E_split="test.jsonl", U_split="train.parquet",
                          prompt_field="question", answer_pattern=r"####\s*(.+)", max_prompt_tokens=MAX_PROMPT_TOKENS)
    config["reward"]["name"] = "math"
    config["batch_config"].update(E_total_sequences=16, G=2, B_U=6, E_num_shards=1, U_num_shards=1)
    config["update"].update(optimizer="adamw", optimizer_state=str(adapter_dir / "optimizer.pt"))
    return config


@pytest.fixture(scope="module")
def probe_run(toy_policy_dir, adapter_dir, data_dir, tmp_path_factory):
    """Snakemake up to results/delta_h1.json on the adapter, E from the jsonl file, U from the
    parquet file; returns (workdir, hashes of the base checkpoint and adapter files before)."""
    work = tmp_path_factory.mktemp("real_inputs")
    (work / "probe.yaml").write_text(yaml.safe_dump(_probe_config(toy_policy_dir, adapter_dir, data_dir)))
    before = {"base": _hash_dir(toy_policy_dir), "adapter": _hash_dir(adapter_dir)}
    run_snakemake(work, "probe.yaml", "--cores", "2", "results/delta_h1.json")
    return work, before


# --------------------------------------------------------------------------- adapter end to end


@pytest.mark.workflow
def test_only_adapter_parameters_in_x_y_v_and_base_unchanged(probe_run, toy_policy_dir, adapter_dir):
    work, before = probe_run
    results = work / "results"
    adapter_names = {n for group in json.loads((adapter_dir / "optimizer_param_names.json").read_text()) for n in group}
    assert len(adapter_names) == 2 * 2 * len(LORA_TARGETS)  # 2 layers x targets x (A, B)
    X, _ = gradients.unpack(read_shard(results / "gradients" / "X.safetensors")[0])
    Y, _ = gradients.unpack(read_shard(results / "gradients" / "Y.safetensors")[0])
    v, v_meta = read_shard(results / "update" / "v.safetensors")
    for name, tensors in (("X", X), ("Y", Y), ("v", v)):
        assert set(tensors) == adapter_names, name
        assert all(_is_adapter_name(n) for n in tensors), name
    assert gradients.global_norm(X) > 0 and gradients.global_norm(Y) > 0  # rewards varied within groups
    # the checkpoint and the adapter on disk are untouched; the spec covers both
    assert _hash_dir(toy_policy_dir) == before["base"] and _hash_dir(adapter_dir) == before["adapter"]
    spec = read_json(results / "policy.json")
    assert "trainable" not in spec and spec["adapter_dir"] == str(Path(adapter_dir).resolve())
    assert spec["fingerprint"] != models.fingerprint(toy_policy_dir)  # the adapter files count
    assert v_meta["model_fingerprint"] == spec["fingerprint"] == models.fingerprint(results / "policy.json")
    delta = read_json(results / "delta_h1.json")
    assert all(k.startswith("base_model.model.model.layers.") for k in delta["X_dot_v_by_module"])
    assert torch.isfinite(torch.tensor(delta["X_dot_v"]))
    log = (results / "logs" / "teacher_force_X_000.log").read_text()
    assert "model.trainable 'adapters': 8 of 29 parameter tensors trainable" in log


@pytest.mark.workflow
def test_adamw_update_uses_the_saved_state(probe_run, adapter_dir):
    """v from the workflow against a real torch.optim.AdamW step on the adapter parameters,
    restored from the saved state (step count, moments, per-group hyperparameters), g = −Y."""
    work, _ = probe_run
    results = work / "results"
    Y, _ = gradients.unpack(read_shard(results / "gradients" / "Y.safetensors")[0])
    v, meta = read_shard(results / "update" / "v.safetensors")
    assert meta["optimizer"] == "adamw" and meta["optimizer_step"] == STEPS
    assert [(g["betas"], g["eps"], g["weight_decay"]) for g in meta["optimizer_param_groups"]] == [
        (list(BETAS), EPS, WD), (list(BETAS), EPS, 0.0)]
    model = models.load_policy(results / "policy.json", "float32", "cpu")
    named = dict(model.named_parameters())
    groups = json.loads((adapter_dir / "optimizer_param_names.json").read_text())
    params = {n: torch.nn.Parameter(named[n].detach().double().clone()) for group in groups for n in group}
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in group]} for group in groups], lr=1.0)
    saved = torch.load(adapter_dir / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved)
    lr = optimizer.param_groups[0]["lr"]
    assert lr == LR
    before = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.grad = -Y[n].double()
    optimizer.step()
    for n, p in params.items():
        assert torch.allclose(before[n] + lr * v[n], p.detach(), rtol=0, atol=1e-12), n
    # the state matters: a fresh optimizer's step is far from v
    fresh = {n: torch.nn.Parameter(before[n].clone()) for n in params}
    fresh_opt = torch.optim.AdamW(list(fresh.values()), lr=lr)
    for n, p in fresh.items():
        p.grad = -Y[n].double()
    fresh_opt.step()
    assert max(float((before[n] + lr * v[n] - fresh[n].detach()).abs().max()) for n in fresh) > 1e-5


@pytest.mark.workflow
def test_prepared_data_plan_and_rollouts_agree(probe_run, data_dir):
    """Both files flowed through prepare_data -> plan -> rollouts: the long prompts were dropped
    and reported, the plan draws only from the kept prompts, the shards hold their token ids."""
    work, _ = probe_run
    results = work / "results"
    e_set, u_set = read_json(results / "data" / "test.jsonl.json"), read_json(results / "data" / "train.parquet.json")
    assert e_set["split"] == "test.jsonl" and u_set["split"] == "train.parquet"
    assert e_set["num_rows"] == 32 and e_set["num_kept"] == 30
    assert e_set["num_dropped_too_long"] == 2 and e_set["dropped_row_indices_head"] == [5, 21]
    assert u_set["num_kept"] == 40 and u_set["num_dropped_too_long"] == 0
    log = (results / "logs" / "prepare_data_test.jsonl.log").read_text()
    assert "2 of 32 prompts are longer than data.max_prompt_tokens = 6" in log
    plan = {kind: read_json(results / "plan" / f"{kind}.json") for kind in ("E", "U")}
    assert plan["E"]["dataset_size"] == 30 and plan["U"]["dataset_size"] == 40
    assert max(plan["E"]["prompt_ids"]) < 30 and len(set(plan["U"]["prompt_ids"])) == 6
    tokenizer = models.load_tokenizer(results / "policy.json")
    for kind in ("E", "U"):
        records = prompts.load_prepared(plan[kind]["data"]["file"] if Path(plan[kind]["data"]["file"]).is_absolute()
                                     else results.parent / plan[kind]["data"]["file"], plan[kind]["data"]["sha256"])
        assert all(len(r["prompt_token_ids"]) <= MAX_PROMPT_TOKENS for r in records)
        assert all(r["answer"] == str(eval(r["prompt"].rstrip("="))) for r in records)  # "#### N" cut to N
        tensors, meta = read_shard(results / "rollouts" / kind / "shard_000.safetensors")
        assert meta["reward"] == {"name": "math", "codes": rewards.legend()}
        assert meta["stop_reasons"] == {"0": "eos", "1": "stop_string", "2": "max_new_tokens"}
        assert meta["data"]["split"] == plan[kind]["data"]["split"]
        B, G, L = tensors["sequences"].shape
        P = L - tensors["token_log_q"].shape[-1]
        for b, pid in enumerate(tensors["prompt_ids"].tolist()):
            ids = records[pid]["prompt_token_ids"]
            assert tensors["sequences"][b, 0, P - len(ids):P].tolist() == ids
            assert tokenizer.decode(ids) == records[pid]["prompt"]
        codes, values = tensors["reward_codes"], tensors["rewards"]
        assert codes.dtype == torch.int8 and codes.shape == (B, G)
        assert ((values == 1) == (codes == rewards.PASS)).all()
        assert ((codes == rewards.PASS) | (codes == rewards.WRONG_ANSWER) | (codes == rewards.NO_ANSWER)).all()
        reasons = tensors["stop_reason"]
        assert torch.equal(reasons == stopping.STOP_EOS, tensors["stopped_at_eos"])


# --------------------------------------------------------------------------------- stop strings


def test_stop_strings_end_responses_without_changing_q(toy_model):
    """A stop string ends a response at the token that completed it; rows it does not touch,
    and the prefixes of those it cuts, are sampled exactly as without stop strings."""
    model, tokenizer = toy_model
    encoded = tokenizer(["12+13=", "9+9=", "1+1=", "19+19="], padding=True, return_tensors="pt")
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=3, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, noise_key=NoiseKey(5, STREAM_E), slots=range(4))
    plain = generate.sample(model, encoded["input_ids"], encoded["attention_mask"], 6, **kw)
    cut = generate.sample(model, encoded["input_ids"], encoded["attention_mask"], 6, stop_strings=["2"],
                          tokenizer=tokenizer, **kw)
    reasons = cut.stop_reason.tolist()
    assert set(reasons) >= {stopping.STOP_EOS, stopping.STOP_STRING}
    for i in range(len(reasons)):
        full = plain.response_tokens[i, :plain.response_lens[i]].tolist()
        n = int(cut.response_lens[i])
        assert cut.response_tokens[i, :n].tolist() == full[:n]  # same tokens up to the stop
        assert torch.equal(cut.token_log_q[i, :n], plain.token_log_q[i, :n])
        assert torch.equal(cut.entropies[i, :n], plain.entropies[i, :n])
        assert (cut.token_log_q[i, n:] == 0).all()
        texts = [tokenizer.decode(full[:k]) for k in range(1, len(full) + 1)]
        first = next((k for k, t in enumerate(texts, 1) if "2" in t), None)  # the token completing "2"
        if first is not None:
            assert reasons[i] == stopping.STOP_STRING and n == first and not cut.stopped_at_eos[i]
        else:
            assert n == plain.response_lens[i] and reasons[i] == plain.stop_reason[i]
    assert stopping.STOP_STRING not in plain.stop_reason.tolist()


def test_response_ends_precedence():
    eos = 7
    tokens = torch.tensor([[1, 2, 7, 7], [1, 7, 7, 7], [1, 2, 3, 4], [1, 2, 3, 4], [3, 7, 7, 7]])
    stop_index = torch.tensor([0, 1, 2, -1, -1])  # row 1: the stop string ends at the EOS itself
    lens, at_eos, reason = stopping.response_ends(tokens, eos, stop_index)
    assert lens.tolist() == [1, 2, 3, 4, 2]
    assert at_eos.tolist() == [False, True, False, False, True]
    assert reason.tolist() == [stopping.STOP_STRING, stopping.STOP_EOS, stopping.STOP_STRING,
                               stopping.STOP_MAX_TOKENS, stopping.STOP_EOS]


# ------------------------------------------------------------------------------ data preparation


def _data_cfg(**overrides) -> dict:
    cfg = load_config(None)["data"]
    cfg.update(overrides)
    return cfg


def test_prompt_template_chat_template_and_budget(toy_model):
    _, tokenizer = toy_model
    rows = [{"a": "1", "b": "2", "answer": "3"}, {"a": "12", "b": "13", "answer": "25"}]
    records, report = prompts.prepare_split(rows, _data_cfg(prompt_template="{a}+{b}="), tokenizer, "train")
    assert [r["prompt"] for r in records] == ["1+2=", "12+13="]
    assert records[1]["prompt_token_ids"] == tokenizer("12+13=")["input_ids"] and report["num_dropped_too_long"] == 0
    records, report = prompts.prepare_split(rows, _data_cfg(prompt_template="{a}+{b}=", max_prompt_tokens=4), tokenizer, "x")
    assert [r["index"] for r in records] == [0] and report["num_dropped_too_long"] == 1
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}={% endif %}"
                          "{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}={% endif %}")
    records, _ = prompts.prepare_split(rows, _data_cfg(prompt_template="{a}+{b}", use_chat_template=True,
                                                    system_prompt="0"), chat, "train")
    assert records[0]["prompt"] == "0=1+2=" and records[0]["prompt_token_ids"] == tokenizer("0=1+2=")["input_ids"]
    with pytest.raises(data.DataError, match="no chat template"):
        prompts.prepare_split(rows, _data_cfg(prompt_template="{a}", use_chat_template=True), tokenizer, "train")
    with pytest.raises(data.DataError, match="no prompt left"):
        prompts.prepare_split(rows, _data_cfg(prompt_template="{a}+{b}=", max_prompt_tokens=1), tokenizer, "train")


@pytest.mark.parametrize("row,cfg,match", [
    ({"prompt": "1+2="}, {}, "'answer' .* is missing"),
    ({"prompt": "1+2=", "answer": None}, {}, "is missing, null or empty"),
    ({"prompt": "1+2=", "answer": "  "}, {}, "is missing, null or empty"),
    ({"prompt": "1+2=", "answer": "3"}, {"answer_pattern": r"####\s*(.+)"}, "does not match"),
    ({"question": "1+2=", "answer": "3"}, {}, "'prompt' .* is missing or empty"),
    ({"prompt": "1+2=", "answer": "3"}, {"prompt_template": "{question}"}, "names field 'question'"),
])
def test_bad_rows_are_errors_naming_the_row(toy_model, row, cfg, match):
    with pytest.raises(data.DataError, match=match) as info:
        prompts.prepare_split([{"prompt": "2+2=", "question": "2+2=", "answer": "#### 4"}, row], _data_cfg(**cfg),
                           toy_model[1], "train")
    assert "row 1" in str(info.value)


def test_local_files_splits_and_sizes(tmp_path, toy_policy_dir):
    import pandas as pd

    rows = [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(7)]
    pd.DataFrame(rows).to_csv(tmp_path / "set_train.csv", index=False)
    pd.DataFrame(rows[:3]).to_parquet(tmp_path / "set_test.parquet")
    (tmp_path / "one.json").write_text(json.dumps(rows[:4]))
    config = load_config(None, {"model": {"name_or_path": str(toy_policy_dir)},
                                "data": {"source": str(tmp_path / "set_train.csv")},
                                "batch_config": {"B_U": 2, "U_num_shards": 1}})
    assert data.raw_size(config, "train") == 7 and data.raw_size(config, "train[:3]") is None
    loaded = data.load_rows(config["data"], "train[2:5]")
    assert [r["answer"] for r in loaded] == [3, 4, 5]
    config["data"]["source"] = str(tmp_path / "one.json")
    assert data.raw_size(config, "train") == 4 and len(data.load_rows(config["data"], "train")) == 4
    templated = {"source": str(tmp_path / "set_{split}.parquet"), "prompt_field": "prompt", "answer_field": "answer"}
    assert [r["prompt"] for r in data.load_rows(templated, "test")] == ["0+1=", "1+1=", "2+1="]
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_rows(templated, "validation")
    with pytest.raises(data.DataError, match="only split is 'train'"):
        data.local_file(str(tmp_path / "one.json"), "test")


def test_a_local_dataset_repository_with_configurations(tmp_path, toy_policy_dir):
    """A local directory laid out as a hub dataset repository (a README declaring configurations)
    is read with data.config_name, as the hub id would be; a file source has no configurations."""
    import datasets

    repo = tmp_path / "org" / "set"
    for name, offset in (("main", 0), ("other", 100)):
        (repo / name).mkdir(parents=True)
        datasets.Dataset.from_list([{"prompt": f"{i + offset}+1=", "answer": i + offset + 1} for i in range(3)]
                                   ).to_parquet(str(repo / name / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                    "    path: main/train-*\n- config_name: other\n  data_files:\n"
                                    "  - split: train\n    path: other/train-*\n---\n")
    source = {"source": str(repo), "prompt_field": "prompt", "answer_field": "answer"}
    assert data.source_kind(str(repo)) == "dir"
    assert [r["answer"] for r in data.load_rows({**source, "config_name": "other"}, "train")] == [101, 102, 103]
    assert [r["answer"] for r in data.load_rows({**source, "config_name": "main"}, "train")] == [1, 2, 3]
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1=", "answer": 2}\n')
    with pytest.raises(ConfigError, match="data.config_name"):
        load_config(None, {"data": {"source": str(tmp_path / "rows.jsonl"), "config_name": "main"},
                           "model": {"name_or_path": str(toy_policy_dir)}})


# ----------------------------------------------------------------------------------- config checks


def _config(overrides: dict) -> dict:
    return load_config(REPO / "config" / "config.yaml", overrides)


def test_model_hub_ids_are_accepted_and_fail_clearly_when_loaded(tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(40)))
    config = _config({"model": {"name_or_path": "entropy-probe-tests/no-such-model"}, "data": {"source": str(rows)}})
    assert config["model"]["name_or_path"] == "entropy-probe-tests/no-such-model"
    with pytest.raises(models.PolicyLoadError, match="could not be fetched from the Hugging Face hub"):
        models.resolve_spec(config["model"])
    for bad, key in [("/no/such/checkpoint", "model.name_or_path"), ("./missing-dir", "model.name_or_path"),
                     ("a/b/c", "model.name_or_path")]:
        with pytest.raises(ConfigError, match=key):
            _config({"model": {"name_or_path": bad}, "data": {"source": str(rows)}})
    with pytest.raises(ConfigError, match="model.adapter_path"):
        _config({"model": {"name_or_path": "org/model", "adapter_path": "/no/such/adapter"}, "data": {"source": str(rows)}})


@pytest.mark.parametrize("overrides,match", [
    ({"model": {"adapter_path": "org/adapter"}}, "model.adapter_path: an adapter needs a checkpoint"),
    ({"model": {"trainable": "adapters"}}, "model.trainable: 'adapters' needs model.adapter_path"),
    ({"data": {"source": "/no/such/prompts.parquet"}}, "data.source"),
    ({"data": {"source": "missing.jsonl"}}, "data.source"),
    ({"data": {"E_split": "test"}}, "embedded prompt set has only the 'train' split"),
    ({"data": {"system_prompt": "be brief"}}, "data.system_prompt"),
    ({"data": {"answer_pattern": "(unclosed"}}, "data.answer_pattern"),
    ({"data": {"prompt_template": "{} and {prompt}"}}, "data.prompt_template"),
    ({"data": {"prompt_template": "{prompt"}}, "data.prompt_template"),
    ({"reward": {"name": "custom"}}, "reward.function"),
    ({"reward": {"name": "custom", "function": "/no/such/file.py:f"}}, "reward.function"),
    ({"reward": {"function": "m:f"}}, "reward.function"),
    ({"reward": {"name": "custom", "function": "no_such_module_xyz:f"}},
     "reward.function: module 'no_such_module_xyz' not found"),
    ({"reward": {"name": "custom", "function": "entropy_probe.rewards:no_such_function"}},
     "reward.function: '.*rewards.py' defines no 'no_such_function'"),
    ({"update": {"optimizer": "adamw", "optimizer_state": "/no/such/optimizer.pt"}},
     "update.optimizer_state: '/no/such/optimizer.pt' does not exist"),
    ({"generation": {"stop_strings": [""]}}, "stop_strings"),
])
def test_bad_model_data_reward_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(overrides)


def test_sizes_checked_early_for_files_and_at_plan_time_after_filtering(tmp_path, toy_policy_dir):
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(5)))
    base = {"model": {"name_or_path": str(toy_policy_dir)}, "data": {"source": str(rows)}}
    with pytest.raises(ConfigError, match="batch_config.B_U: 6 distinct prompts > dataset size 5"):
        _config(base | {"batch_config": {"B_U": 6}})
    prepared = {"split": "train", "num_kept": 3, "num_dropped_too_long": 2}
    with pytest.raises(ConfigError, match="B_U: 4 distinct prompts, but .* 3 prompts after data.max_prompt_tokens dropped 2"):
        check_against_prepared("U", {"B_U": 4}, prepared)
    with pytest.raises(ConfigError, match="E_total_sequences: distinct mode needs 4 prompts"):
        check_against_prepared("E", {"E_total_sequences": 8, "G": 2, "E_sampling_mode": "distinct"}, prepared)
    check_against_prepared("E", {"E_total_sequences": 8, "G": 2, "E_sampling_mode": "replacement"}, prepared)


def test_example_config_is_valid_against_the_schema():
    example = yaml.safe_load((REPO / "config" / "examples" / "qwen2.5-1.5b-lora-gsm8k.yaml").read_text())
    fill_defaults(example)
    validate(example)
    assert example["model"]["checkpoint"] and example["update"]["optimizer"] == "adamw"
    assert example["data"]["source"] == "openai/gsm8k" and example["reward"]["name"] == "math"
    # the parts of the cross-field check that need no files pass too (with its files in place, the
    # whole config is checked by tests/test_recipes.py: "Probe your model")
    example["model"].update(checkpoint="", trainable="auto", device="cpu")  # a directory (checked to exist)
    check_config(example)


# ------------------------------------------------------------------------------- adapter loading


def test_adapter_loading_trainable_modes_and_optimizer_names(toy_policy_dir, adapter_dir, tmp_path):
    spec_path = tmp_path / "policy.json"
    write_json(spec_path, models.resolve_spec({"name_or_path": str(toy_policy_dir), "adapter_path": str(adapter_dir)}))
    model = models.load_policy(spec_path, "float32", "cpu")  # trainable "auto": the adapters
    assert not model.training and all(not m.training for m in model.modules())  # dropout off
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_adapter_name(n) for n in trainable)
    base = models.load_policy(toy_policy_dir, "float32", "cpu")
    for name, p in base.named_parameters():  # the base weights are the checkpoint's, unmerged
        peft_name = "base_model.model." + name.replace("q_proj.weight", "q_proj.base_layer.weight").replace(
            "v_proj.weight", "v_proj.base_layer.weight")
        assert torch.equal(dict(model.named_parameters())[peft_name], p), name
    # the same forward twice: deterministic (no dropout)
    ids = torch.tensor([[1, 10, 2, 11]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    everything = models.load_policy(spec_path, "float32", "cpu", trainable="all")
    assert all(p.requires_grad for p in everything.parameters())

    params = {n: p.detach() for n, p in model.named_parameters()}
    loaded = load_adamw_state(adapter_dir / "optimizer.pt", adapter_dir / "optimizer_param_names.json", params)
    assert set(loaded.per_param) == trainable and loaded.steps == [STEPS]
    groups = json.loads((adapter_dir / "optimizer_param_names.json").read_text())
    stripped = tmp_path / "names_stripped.json"  # the adapter file's key style: no ".default"
    stripped.write_text(json.dumps([[n.replace(".default.", ".") for n in g] for g in groups]))
    with pytest.raises(OptimizerStateError, match=r"the policy's PEFT name is '.*lora_A\.default\.weight'"):
        load_adamw_state(adapter_dir / "optimizer.pt", stripped, params)
    short = tmp_path / "names_short.json"
    short.write_text(json.dumps([n for g in groups for n in g][:-1]))
    with pytest.raises(OptimizerStateError, match="7 parameter names, but the optimizer state has 8"):
        load_adamw_state(adapter_dir / "optimizer.pt", short, params)
    swapped = tmp_path / "names_swapped.json"  # A and B groups swapped: shapes disagree
    swapped.write_text(json.dumps(groups[::-1]))
    with pytest.raises(OptimizerStateError, match="shape"):
        load_adamw_state(adapter_dir / "optimizer.pt", swapped, params)
    base_params = {n: p.detach() for n, p in base.named_parameters()}
    with pytest.raises(OptimizerStateError, match="set model.adapter_path"):
        load_adamw_state(adapter_dir / "optimizer.pt", adapter_dir / "optimizer_param_names.json", base_params)
