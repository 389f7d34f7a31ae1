"""The one exception for bad input, at the bottom of the package (it imports nothing of vllm_lab), so that
every module can raise it without reaching up: spec, commands and the engines alike."""


class SpecError(ValueError):
    """Bad input: the message is one line naming the field and how to fix it (the CLI exits 2)."""
