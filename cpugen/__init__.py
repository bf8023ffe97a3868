"""cpugen: bf16 text generation with large decoder-only models on CPUs."""

__version__ = "0.1.0"
