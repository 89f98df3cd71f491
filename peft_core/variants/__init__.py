"""LoRA variants beyond the built-in "lora" (see ``peft_core.lora.LoraVariant`` for the contract).

A file ``<name>.py`` here that defines a class decorated with ``@register_variant("<name>")``
makes ``[adapter] kind = "<name>"`` work: ``peft_core.lora.get_variant`` imports it on first
use. ``lora_fa.py`` (A frozen, PEFT-compatible) and ``gated.py`` (a learned gate per rank, not
PEFT-compatible) are the worked examples; ``dora.py`` is DoRA, saved as PEFT's ``use_dora``.
"""
