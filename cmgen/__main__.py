from cmgen.cli import entry

entry()
