class MistralError(Exception):
    """A mistake the user can fix: bad input, a broken model folder, an unsupported setting.

    The message is one line that says what is wrong and what to do about it. The CLI prints it
    without a traceback; anything else that escapes is a bug in this library.
    """
