"""Errors caused by the user's input; command-line tools print them as one line and exit 2."""


class UserInputError(Exception):
    """A request that cannot be carried out as given; the message names the problem and the fix."""
