"""The P4 program and its committed P4Info, shipped as package data (``switchreduce.p4src``)."""
