"""Retention: which versions and local files to delete, and deleting them.

`plan` decides (pure functions of the state gathered: no I/O); `run` gathers that state
from the sink, the journal and the disk, carries the plan out, records and retries.
"""
