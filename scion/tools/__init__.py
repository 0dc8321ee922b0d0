"""Tools for working on scion itself (not used by the commands)."""
