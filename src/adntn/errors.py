"""User-facing errors.

Every failure a user can cause (bad file, unknown layer, impossible budget, ...) is raised as an
:class:`AdntnError` whose message is one complete sentence. The CLI prints that sentence on stderr
and exits non-zero; library callers can catch it.
"""


class AdntnError(Exception):
    """An error caused by the user's input, with a one-sentence explanation."""
