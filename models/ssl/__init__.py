"""See the submodules."""
