"""The ``electfsm`` command: parsing, the child supervisor, each command, the demo.

Entry point: :func:`electfsm.cli.main.entry` (the console script).
"""
