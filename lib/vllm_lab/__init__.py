"""vllm-lab: launch the real vLLM server, classify why it fails, measure the largest stable context."""

__version__ = "0.1.0"
