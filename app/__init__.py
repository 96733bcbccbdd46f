"""kvchat's front ends: the command line and the Textual chat app."""

__version__ = "0.1.0"
