"""LoRA variants beyond the built-in "lora" and "dora" (see ``peft_core.lora``).

A file ``<name>.py`` here that defines a class decorated with ``@register_variant("<name>")``
makes ``[adapter] kind = "<name>"`` work: ``peft_core.lora.get_variant`` imports it on first
use. ``lora_fa.py`` is the worked example.
"""
