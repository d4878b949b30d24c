from erde.cli.main import command

command()
