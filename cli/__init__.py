"""The ``pyroseg`` command line: thin click commands over the library."""
