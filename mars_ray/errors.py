"""User-facing errors.

Everything a user can get wrong (a name, a number, a file) raises a subclass of
:class:`MarsError` whose message is one line saying what was wrong and what is
accepted. The CLI prints that line and exits non-zero; it never shows a traceback
for these.
"""


class MarsError(Exception):
    """Base class for errors caused by user input or configuration."""


class ConfigError(MarsError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnknownNameError(MarsError, KeyError):
    """A name (policy, workload, GPU, model) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TraceError(MarsError, ValueError):
    """A trace file is missing, malformed or violates the schema."""


class InfeasibleError(MarsError, ValueError):
    """A request can never be served (e.g. a prompt larger than the KV cache)."""
