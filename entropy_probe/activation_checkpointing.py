"""Gradient checkpointing of the decoder layers for the gradient passes
(``teacher_forcing.gradient_checkpointing``): each layer keeps only its input for the backward and
recomputes its activations there, so activation memory grows with one layer's worth per token
instead of all layers' — for long responses, at the price of one more forward pass.

Transformers' own switch (``gradient_checkpointing_enable``) acts only in training mode, which
would also switch on dropout (LoRA dropout, attention dropout); the passes run the policy in eval
mode, so the layers' ``forward`` is wrapped here instead, for the duration of a pass. The
recomputation runs the same kernels on the same inputs under the same autocast state
(``torch.utils.checkpoint``, non-reentrant), so the gradients are the plain pass's.
"""
from __future__ import annotations

import contextlib
import functools

import torch.utils.checkpoint
from torch import nn

from .errors import ProbeError


class CheckpointingError(ValueError, ProbeError):
    """A policy whose decoder layers cannot be found."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer layers (``get_decoder().layers``, as in Llama, Qwen,
    Mistral, Gemma and their PEFT wrappers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise CheckpointingError(f"teacher_forcing.gradient_checkpointing: cannot find the decoder layers of "
                                 f"{type(model).__name__} (no get_decoder().layers)")
    return layers


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True):
    """Within the block, every decoder layer of ``model`` runs under activation checkpointing
    (no-op when not ``enabled``); the layers are restored on exit, also after an error."""
    if not enabled:
        yield
        return
    layers = list(decoder_layers(model))
    for layer in layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(layer).forward.__get__(layer),
                                          use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
