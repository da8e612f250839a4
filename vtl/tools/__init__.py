"""What people run: the CLI and its commands (attack, bench, caps, memmap), built on
vtl.run and below.  A new command is a module here plus a sub-parser in cli.py."""
