"""The ``fortify`` command line. Each subcommand lives in ``fortify.cli.cmd_<name>``."""
