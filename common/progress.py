"""The tag that marks the ServerApp's progress lines in Flower's log, for the commands that show
only those (fedistill/console.py); a module of its own so that they need not import torch."""

PROGRESS_TAG = "[fedistill] "
