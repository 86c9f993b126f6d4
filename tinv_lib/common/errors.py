"""User-facing errors. Each carries a one-line message that the scripts print as-is (no
traceback): bad input must say what is wrong and with which file, and lose nothing."""


class TinvError(Exception):
    """An error caused by the user's input or files, reported as one line."""


class FileFormatError(TinvError):
    """A file is not in any format we know, or is damaged."""


class UnsafeFileError(FileFormatError):
    """A pickle-based file asks to run code or build objects we do not allow."""
