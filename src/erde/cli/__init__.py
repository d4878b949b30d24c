"""The command line: parsing and printing over the library's calls, one module per command group."""
