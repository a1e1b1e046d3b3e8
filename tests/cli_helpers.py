"""Running the ``meanflow`` command inside a test."""

from meanflow.cli import main


def run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``meanflow ARGV``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
