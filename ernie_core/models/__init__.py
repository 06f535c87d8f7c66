"""ERNIE 4.5 models: the dense causal LM (plain nn.Module) and its HF / Paddle checkpoint IO."""
from .config import Ernie4_5Config
from .ernie4_5 import CausalLMOutput, Ernie4_5ForCausalLM, Ernie4_5Model

__all__ = ["CausalLMOutput", "Ernie4_5Config", "Ernie4_5ForCausalLM", "Ernie4_5Model"]
