"""What star-scale reads from files it did not write itself, and what it keeps out of files and logs.

``load.py``: torch files load with ``weights_only=True`` or are refused.
``secrets.py``: credentials in URIs are taken out before anything prints or saves them.
"""


class RefusedFile(ValueError):
    """A file that cannot be read without running code from it (or is not what it claims): exit 2, one line."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")
