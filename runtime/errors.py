"""One error type for everything a user can cause: the CLI prints its message as one line and exits 1."""


class KoedgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""
