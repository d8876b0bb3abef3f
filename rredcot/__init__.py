"""rredcot: RL fine-tuning of reasoning models with GRPO and RREDCoT credit assignment."""

__version__ = "0.1.0"
