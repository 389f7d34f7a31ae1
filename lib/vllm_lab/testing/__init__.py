"""Test doubles (the fake vLLM server). Results from them always say backend=fake."""
