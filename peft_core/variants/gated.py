"""Gated LoRA: a learned gate per rank, y = W x + b + s B diag(g) A dropout(x), g starts at ones.

The example of a variant whose math is not LoRA's. It overrides ``delta`` (the forward) and
``delta_weight`` (the merged update s B diag(g) A), adds a parameter not named ``lora_*``
(``rank_gate``, which trains because ``tensors`` lists it) and is not PEFT-compatible: it is
saved with ``peft_type = "LEANTUNE"`` and ``leantune_variant = "gated"``, which PEFT refuses.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from leantune.peft_core.lora import LoraVariant, register_variant


@register_variant("gated")
class GatedVariant(LoraVariant):
    fused_4bit = False  # the reference path on a 4-bit base
    linear = False  # W + s B diag(g) A is not a plain LoRA export of a base-rewriting init
    peft_compatible = False

    def init(self, layer, name):
        if not hasattr(layer, "rank_gate"):
            layer.rank_gate = nn.ParameterDict()
        A = layer.lora_A[name].weight
        layer.rank_gate[name] = nn.Parameter(torch.ones(A.shape[0], device=A.device, dtype=A.dtype))

    def delta(self, layer, name, x, result):
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # in the adapter's dtype, as LoRA
        xa = F.linear(layer.lora_dropout[name](x.to(A.dtype)), A) * layer.rank_gate[name]  # (..., r)
        return F.linear(xa, B) * layer.adapters[name].scaling  # s B diag(g) A x_d

    def delta_weight(self, layer, name):
        A, B = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        return layer.adapters[name].scaling * ((B * layer.rank_gate[name].float()) @ A)  # s B diag(g) A

    def shapes(self, in_features, out_features, r):
        return {**super().shapes(in_features, out_features, r), "rank_gate": (r,)}

    def tensors(self, layer, name):
        return {**super().tensors(layer, name), "rank_gate": layer.rank_gate[name]}
