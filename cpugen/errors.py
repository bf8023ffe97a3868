"""The one exception type users see: its message is the whole error, on one line."""


class CpugenError(Exception):
    """Bad input or an impossible request. The CLI prints `cpugen: error: <message>` and exits 2.

    Messages say what is wrong and what to change, e.g.
    "unknown model 'gptj-7b': use a preset (gptj-1b, gptj-6b, ...), a config JSON or a checkpoint directory".
    """
