"""Errors caused by the user's input; command-line tools print them as one line and exit 2."""


class UserInputError(Exception):
    """A request that cannot be carried out as given; the message names the problem and the fix."""


class PruningRequestError(UserInputError, ValueError):
    """A pruning request that cannot be carried out (unknown or fixed group, bad channel
    indices, removing every channel, breaking a GroupNorm multiple, a width a latency table does
    not know)."""
