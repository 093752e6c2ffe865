"""dpojax: Direct Preference Optimization and its family of losses, in JAX, for Hugging Face causal LMs."""

__version__ = "0.1.0"
