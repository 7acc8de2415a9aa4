"""The P4Runtime layer both control planes share, at the bottom of the package.

The controller writes a job's entries to a switch over P4Runtime; the soft
switch's static mode applies the same entries to its tables directly. Both
therefore take from here what the entries are and how they are named:

- ``schema``: the P4Info, resolved (names <-> ids, bit widths, sizes);
- ``names``: the P4 program's tables, actions, registers and counters,
  declared once (checked against the P4Info by tests/test_p4src.py);
- ``entities``: table entries, multicast groups, updates and their
  P4Runtime encoding, values sized by the schema;
- ``jobs`` and ``forwarding``: the entries a job and a host need.
"""
