"""User-facing errors. Each carries a one-line message that the scripts print as-is (no
traceback): bad input must say what is wrong and with which file, and lose nothing."""


class TinvError(Exception):
    """An error caused by the user's input or files, reported as one line."""


class FileFormatError(TinvError):
    """A file is not in any format we know, or is damaged."""


class UnsafeFileError(FileFormatError):
    """A pickle-based file asks to run code or build objects we do not allow."""


class ArgumentError(TinvError):
    """A flag or config file value is invalid (exit status 2, before anything loads)."""


def first_line(error: BaseException, with_type: bool = False) -> str:
    """The part of an exception a person reads in a one-line report: the first line of its
    message (its type's name when the message is empty), after `Type: ` when `with_type`."""
    text = (str(error).strip().splitlines() or [""])[0]
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if with_type else text
