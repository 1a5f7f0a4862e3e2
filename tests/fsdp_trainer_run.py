"""A real two-process FSDP2 run of the HF ``Trainer`` on the embedded policy, on the CPU (gloo),
saving a sharded checkpoint after every step: ``checkpoint-N/pytorch_model_fsdp_0/`` and
``optimizer_0/`` as DCP folders, ``scheduler.pt``, ``trainer_state.json`` — what accelerate
writes for FSDP with ``SHARDED_STATE_DICT`` on GPUs.

Run by tests/test_sharded_checkpoint.py as
``torchrun --standalone --nproc_per_node 2 tests/fsdp_trainer_run.py POLICY_DIR OUT_DIR``.
Rank 0 also writes ``OUT_DIR/records.pt`` (``weights_only``-loadable): per optimizer step the
clipped gradient the optimizer received, and per saved step the full parameters and AdamW
moments the ranks held (gathered from their shards), to hold the probe's reading to.

accelerate runs FSDP only on accelerators: with ``use_cpu`` it silently wraps the model in DDP.
The Trainer subclass below turns FSDP back on after the accelerator is built (before the model
is prepared), which gives the same ``fully_shard`` wrapping and the same checkpoint code as on
GPUs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

STEPS = 3


def _full(tensor):
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


class FSDPOnCPUTrainer(Trainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


class Recorder(TrainerCallback):
    def __init__(self):
        self.gradients, self.parameters, self.moments = [], {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append({n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None})

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        named = dict(model.named_parameters())
        self.parameters[state.global_step] = {n: _full(p) for n, p in named.items()}
        by_param = {p: n for n, p in named.items()}
        self.moments[state.global_step] = {by_param[p]: {k: _full(s[k]) for k in ("exp_avg", "exp_avg_sq")}
                                           for p, s in optimizer.state.items()}


def main(policy_dir: str, out_dir: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size - 1, (32, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-3, weight_decay=0.1,
        lr_scheduler_type="linear", max_grad_norm=1.0, save_strategy="steps", save_steps=1, use_cpu=True,
        report_to=[], seed=0, disable_tqdm=True,
        fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True})
    recorder = Recorder()
    trainer = FSDPOnCPUTrainer(model=model, args=args, train_dataset=rows, callbacks=[recorder])
    trainer.train()
    if not type(next(trainer.model.parameters())).__name__ == "DTensor":
        raise SystemExit("the model was not sharded by FSDP2")
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"gradients": recorder.gradients, "parameters": recorder.parameters, "moments": recorder.moments,
                    "log_history": [{k: float(v) for k, v in e.items() if isinstance(v, (int, float))}
                                    for e in trainer.state.log_history]},
                   Path(out_dir) / "records.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
