"""The one exception type whose message is shown to the Docker user as is."""


class L3netError(Exception):
    """A failure with a message written for the user (dockerd shows it after the method name)."""
