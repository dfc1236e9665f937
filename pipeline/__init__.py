"""ftpipe library: everything that computes. The CLI (cli.py) only parses options and calls in here."""

__version__ = "0.1.0"
