"""Exceptions a caller can act on: each names what was wrong and the numbers involved."""


class TimeBillError(Exception):
    """Base class of every error this package raises on purpose."""


class EmptyPromptError(TimeBillError, ValueError):
    """The prompt has no tokens to condition on."""


class InvalidAlphaError(TimeBillError, ValueError):
    """An eviction ratio outside [0, 1)."""


class PromptTooLongError(TimeBillError, ValueError):
    """Prompt (plus the tokens asked for) does not fit the model's context."""


class UnknownPressError(TimeBillError, KeyError):
    """No eviction press registered under that name."""

    def __str__(self):  # KeyError quotes its argument; we want a sentence
        return str(self.args[0]) if self.args else ''


class DeadlinePassedError(TimeBillError, ValueError):
    """The request's absolute deadline is already behind us."""


class InvalidRequestError(TimeBillError, ValueError):
    """Any other malformed request field (policy name, token count, budget)."""


class ProfileMismatchError(TimeBillError):
    """A timing profile measured for another model/dtype/device/threads/library set."""


class ModelLoadError(TimeBillError):
    """The configured model could not be found or loaded."""


class PrefillStopped(TimeBillError):
    """
    A chunked prefill stopped between chunks because ``should_stop`` gave a reason.

    The caller maps the reason (cancel, deadline, ...) to its own status. ``done_tokens`` were
    prefilled.
    """

    def __init__(self, reason: str, done_tokens: int):
        super().__init__(reason, done_tokens)  # both in args: the error pickles across processes
        self.reason = reason
        self.done_tokens = int(done_tokens)

    def __str__(self):
        return f'prefill stopped after {self.done_tokens} tokens: {self.reason}'
