"""Stage-2 plug-ins, one per kind of store."""
