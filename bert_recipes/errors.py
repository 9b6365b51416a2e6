"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing file, a malformed TSV) raises a
subclass of :class:`UserError` whose message is ONE line naming the file or key and what
was expected. The CLI prints it as ``error: <message>`` and exits with code 2, without a
traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message is a single line."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe file or override is invalid."""


class DataError(UserError):
    """Input data is missing, empty or malformed."""


class TrainingError(UserError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty),
    for one-line errors that wrap a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
