"""The one exception type the scripts turn into a one-line message."""


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    Scripts print it as ``error: <message>`` and exit with `exit_code`, without a traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
