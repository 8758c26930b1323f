"""The one error type users see. The CLI turns it into a message and exit code 2."""


class OmnimergeError(Exception):
    """A problem with the user's input: a message that names the file, the tensor and the fix."""

    exit_code = 2
