"""Fine-tuning backends for LEAP students: SFT, DPO and KTO through TRL with PEFT LoRA adapters.

Heavy imports (torch, transformers, TRL) happen inside the functions, so importing this package is cheap.
"""

from leap_dspy.train.config import TrainConfig, TrainResult
from leap_dspy.train.merge import merge_adapter
from leap_dspy.train.preference import train_dpo, train_kto
from leap_dspy.train.sft import train_sft

__all__ = ["TrainConfig", "TrainResult", "merge_adapter", "train_dpo", "train_kto", "train_sft"]
