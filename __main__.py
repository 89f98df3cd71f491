from leantune.cli import entry

entry()
