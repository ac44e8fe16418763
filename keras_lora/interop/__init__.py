"""Interoperability with other LoRA formats: Hugging Face PEFT adapters."""

from keras_lora.interop.peft import load_peft_adapter, save_peft_adapter

__all__ = ["load_peft_adapter", "save_peft_adapter"]
