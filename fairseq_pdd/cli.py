"""Console entry points."""
import os


def user_dir() -> str:
    """The directory to pass to fairseq's ``--user-dir`` (this package's own folder)."""
    return os.path.dirname(os.path.abspath(__file__))


def print_user_dir() -> None:
    """``fairseq-pdd-user-dir``: print the ``--user-dir`` path, for ``fairseq-train --user-dir $(...)``."""
    print(user_dir())
