"""No file star-scale reads runs code; no secret it is given lands in a file or a log.

``load.py``: torch files load with ``weights_only=True`` or are refused (``RefusedFile``, exit code 2).
``credentials.py``: credentials in URIs are taken out before anything prints or saves them.
"""


class RefusedFile(ValueError):
    """A file that cannot be read without running code from it (or is not what it claims): exit 2, one line."""

    def __init__(self, path, reason: str, names: tuple = ()):
        self.path, self.reason, self.names = str(path), reason, tuple(names)  # names: the globals it would run
        super().__init__(f"{path}: {reason}")
