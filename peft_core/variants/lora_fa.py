"""LoRA-FA: LoRA with A frozen at its random init; only B trains.

Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation",
https://arxiv.org/abs/2308.03303. With A frozen, the backward never needs
dA = s (dY B)^T X, so X does not have to be kept for the adapter: only X A^T (r numbers per
token) is. Autograd sees that on its own in the reference path (A does not require grad),
and the fused 4-bit path (``quant.fused_lora``) saves X only when A trains.

The worked example of a variant. It overrides two hooks of ``peft_core.lora.LoraVariant``:

- ``init``: runs after A and B are initialised (any init, PiSSA included) and freezes A;
- ``set_trainable``: keeps A frozen when the adapter is made trainable again.

Everything else (forward delta, merge, saved keys) is standard LoRA, so a LoRA-FA adapter is
saved in PEFT's plain LoRA format and PEFT loads it as is; leantune records the kind in the
safetensors metadata so it loads back as LoRA-FA.
"""
from __future__ import annotations

from leantune.peft_core.lora import LoraVariant, register_variant


@register_variant("lora_fa")
class LoraFAVariant(LoraVariant):
    def init(self, layer, name):
        layer.lora_A[name].weight.requires_grad_(False)

    def set_trainable(self, layer, name, trainable):
        super().set_trainable(layer, name, trainable)
        layer.lora_A[name].weight.requires_grad_(False)
