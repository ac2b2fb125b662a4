"""Integrations of llmkern kernels into other libraries' model code."""
