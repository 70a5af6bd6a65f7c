"""Tools for people: the engine simulator (and, later, tail)."""
