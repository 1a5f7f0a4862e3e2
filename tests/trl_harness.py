"""A real TRL ``GRPOTrainer`` on the embedded policy, on the CPU, for checking the probe's Y
(DESIGN §2b) and its reading of trainer checkpoints against TRL's own code.

- :func:`make_trainer`: a ``GRPOTrainer`` on the toy checkpoint (its tokenizer, a small in-memory
  ``datasets.Dataset`` of ``a+b=`` prompts, exact-match reward), β = 0, on-policy
  (``num_iterations`` 1), no vLLM, fp32, τ as given with top-p 1 and top-k 0.
- :func:`generate_batch`: one U batch as TRL builds it (``_generate_and_score_completions``).
- :func:`trl_loss_gradient`: Y = −∇ of TRL's ``compute_loss`` on that batch, summed over its
  micro-batches as the Trainer's gradient accumulation does.
- :func:`objective_gradient`: ∇ Σ_i c_i Σ_k log softmax(z_ik/τ)(y_ik) by plain autograd, in
  TRL's own input layout (left-padded prompt | right-padded completion), for any coefficients c.
- :func:`run_training`: a few real ``train()`` steps that save a checkpoint after every step,
  recording each step's batch and the gradient the optimizer received.

Nothing here copies a TRL formula: the loss, the advantages, the micro-batch split and the
optimizer step are TRL's and transformers' code.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from entropy_probe.rewards import exact_match

# a+b= prompts of 4, 5 and 6 tokens (so TRL left-pads the prompts of a batch)
PROMPT_INDICES = (23, 67, 305, 399)
TEMPERATURE = 1.3
MAX_COMPLETION_LENGTH = 4


def toy_rows(policy_dir: str | Path, indices=PROMPT_INDICES) -> list[dict]:
    rows = [json.loads(line) for line in (Path(policy_dir) / "prompts.jsonl").read_text().splitlines()]
    return [rows[i] for i in indices]


class RewardLog:
    """Exact-match reward as a TRL reward function; remembers every call's completions and rewards."""

    __name__ = "exact_match"

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, answer, **kwargs) -> list[float]:
        values = [exact_match(c, a) for c, a in zip(completions, answer)]
        self.calls.append({"prompts": list(prompts), "completions": list(completions), "rewards": values})
        return values


def grpo_config(output_dir: str | Path, **overrides):
    from trl import GRPOConfig

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=16, num_generations=4,
        max_completion_length=MAX_COMPLETION_LENGTH, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, use_vllm=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
        seed=0, max_steps=1, save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def make_trainer(policy_dir: str | Path, output_dir: str | Path, rows: list[dict] | None = None,
                 trainer_cls=None, callbacks=None, peft_config=None, **config):
    """A ``GRPOTrainer`` on a fresh copy of the toy policy (TRL patches the model's forward);
    with ``peft_config`` TRL wraps it in a PEFT model and trains the adapter only."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reward = RewardLog()
    trainer = (trainer_cls or GRPOTrainer)(
        model=model, reward_funcs=reward, args=grpo_config(output_dir, **config),
        train_dataset=Dataset.from_list(rows if rows is not None else toy_rows(policy_dir)),
        processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config,
    )
    trainer.reward_log = reward
    return trainer


def generate_batch(trainer, rows: list[dict], seed: int = 0) -> dict:
    """TRL's inputs for one generation batch: ``_generate_and_score_completions`` on each row
    repeated ``num_generations`` times (prompt-major, as TRL's ``RepeatSampler`` orders them),
    in train mode; the reward call's completions and rewards are added under ``_rewards``."""
    G = trainer.num_generations
    torch.manual_seed(seed)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions([row for row in rows for _ in range(G)])
    inputs["_rewards"] = torch.tensor(trainer.reward_log.calls[-1]["rewards"], dtype=torch.float64)
    inputs["_completions"] = trainer.reward_log.calls[-1]["completions"]
    return inputs


def micro_batches(inputs: dict, count: int) -> list[dict]:
    """TRL's split of a generation batch into ``count`` micro-batches (``split_tensor_dict``),
    without its shuffle: micro-batch m holds responses [m·n/count, (m+1)·n/count)."""
    from trl.trainer.utils import split_tensor_dict

    tensors = {k: v for k, v in inputs.items() if not k.startswith("_")}
    return split_tensor_dict(tensors, count)


def trl_loss_gradient(trainer, inputs: dict, num_micro_batches: int) -> dict[str, Tensor]:
    """Y = −∇ of TRL's loss on ``inputs``: ``compute_loss`` on each micro-batch, backward, summed,
    exactly as the Trainer's accumulation loop does (GRPOTrainer's loss is already scaled for
    gradient accumulation: ``loss_is_scaled_for_ga``), float64, keyed by parameter name."""
    assert trainer.loss_is_scaled_for_ga is True
    assert trainer.args.gradient_accumulation_steps == num_micro_batches == trainer.args.steps_per_generation
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = num_micro_batches  # what Trainer's loop sets per update
    for batch in micro_batches(inputs, num_micro_batches):
        trainer.compute_loss(model, batch).backward()
    grads = {n: -p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def token_log_probs(model, inputs: dict, temperature: float) -> Tensor:
    """log softmax(z/τ)(y) ``[N, C]`` of every completion token (zero past the completion), in
    TRL's layout: input = left-padded prompt | right-padded completion, no position ids."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    C = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -C - 1:-1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    return lp * inputs["completion_mask"]


def objective_gradient(model, inputs: dict, coefficients: Tensor, temperature: float) -> dict[str, Tensor]:
    """∇ Σ_i c_i Σ_k log p_ik, c ``[N]`` (prompt-major), by plain autograd; float64 by name."""
    model.zero_grad(set_to_none=True)
    lp = token_log_probs(model, inputs, temperature)
    (coefficients.to(lp.dtype) * lp.sum(-1)).sum().backward()
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def lengths(inputs: dict, G: int) -> Tensor:
    """T ``[B, G]``: tokens of each completion (EOS included), as TRL's completion mask counts them."""
    return inputs["completion_mask"].sum(-1).view(-1, G)


def to_rollout(inputs: dict, G: int) -> dict[str, Tensor]:
    """The U batch as a rollout shard of the project (``entropy_probe.rollout``): sequences
    ``[B, G, P+T]`` left-padded prompt + right-padded response, lengths, advantages."""
    P, C = inputs["prompt_ids"].shape[1], inputs["completion_ids"].shape[1]
    N = inputs["prompt_ids"].shape[0]
    B = N // G
    T = lengths(inputs, G)
    return {
        "sequences": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1).view(B, G, P + C),
        "attention_masks": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1).view(B, G, P + C),
        "prompt_lens": inputs["prompt_mask"].sum(-1).view(B, G)[:, 0],
        "response_lens": T,
        "max_lengths": T.max(-1).values,
        "advantages": inputs["advantages"].view(B, G).double(),
        "rewards": inputs["_rewards"].view(B, G),
        "token_log_q": torch.zeros(B, G, C),
    }


def relative_error(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all parameters (same keys)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    norm = sum(float((b[k] ** 2).sum()) for k in b)
    return (diff / norm) ** 0.5


# ---------------------------------------------------------------------------- a real training run


@dataclass
class StepRecord:
    """One optimizer step of the run: its micro-batches as ``compute_loss`` received them (after
    TRL's shuffle and split), the reward calls, and the gradient the optimizer stepped with."""

    micro_batches: list[dict] = field(default_factory=list)
    gradient: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TrainingRun:
    output_dir: Path
    steps: list[StepRecord]
    rewards: list[dict]  # RewardLog calls: prompts, completions, rewards (one per generation batch)
    seconds: float
    log_history: list[dict]

    def checkpoint(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"


def _recording_trainer_cls():
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class RecordingGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that keeps a copy of every micro-batch ``compute_loss`` receives."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                if not self.records or self.records[-1].gradient:
                    self.records.append(StepRecord())
                self.records[-1].micro_batches.append(
                    {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class GradientRecorder(TrainerCallback):
        """The gradient as the optimizer receives it (after clipping), just before ``step()``."""

        def __init__(self, trainer_ref: list):
            self.trainer_ref = trainer_ref

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            trainer = self.trainer_ref[0]
            trainer.records[-1].gradient = {n: p.grad.detach().double().clone()
                                            for n, p in trainer.model.named_parameters() if p.grad is not None}

    return RecordingGRPOTrainer, GradientRecorder


def run_training(policy_dir: str | Path, output_dir: str | Path, *, max_steps: int = 4, peft_config=None,
                 **config) -> TrainingRun:
    """``train()`` for ``max_steps`` optimizer steps: B = 4 prompts × G = 4 per step in two
    micro-batches (gradient accumulation 2), torch AdamW with weight decay 0.1 (two param groups),
    a linear learning-rate decay, gradient clipping at 1.0, ``loss_type`` dapo, a checkpoint with the
    optimizer and scheduler state after every step (with ``peft_config``: the adapter's). Seeded;
    records each step (:class:`StepRecord`)."""
    trainer_cls, recorder_cls = _recording_trainer_cls()
    ref: list = []
    settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=max_steps,
                    learning_rate=2e-4, weight_decay=0.1, optim="adamw_torch", lr_scheduler_type="linear",
                    warmup_steps=0, max_grad_norm=1.0, loss_type="dapo", save_strategy="steps", save_steps=1,
                    save_only_model=False, shuffle_dataset=True)
    settings.update(config)
    rows = toy_rows(policy_dir, range(0, 400, 7))
    trainer = make_trainer(policy_dir, output_dir, rows, trainer_cls=trainer_cls, callbacks=[recorder_cls(ref)],
                           peft_config=peft_config, **settings)
    trainer.records = []
    ref.append(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return TrainingRun(Path(output_dir), trainer.records, trainer.reward_log.calls, seconds,
                       list(trainer.state.log_history))


def toy_trainer_state(hidden_size: int = 48, frozen: tuple[str, ...] = ()) -> dict:
    """An AdamW ``state_dict`` as the HF Trainer saves it (its decay / no-decay param groups,
    weight decay 0.1 / 0.0, one step taken) of a toy model with ``hidden_size``, trained with the
    parameters ``frozen`` frozen: a state for another model, or for other trainable parameters."""
    from entropy_probe.toy import build_model
    from entropy_probe.trainer_checkpoint import trainer_param_groups

    other = build_model(seed=1, hidden_size=hidden_size)
    for name, param in other.named_parameters():
        param.requires_grad_(name not in frozen)
    decay, no_decay = trainer_param_groups(other)
    named = dict(other.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in decay], "weight_decay": 0.1},
                                   {"params": [named[n] for n in no_decay], "weight_decay": 0.0}], lr=1e-3)
    other(input_ids=torch.tensor([[0, 10, 1, 11]])).logits.sum().backward()
    optimizer.step()
    return optimizer.state_dict()
