"""Gateway benchmarks: `python -m bench` (full) or `python -m bench --quick` (CI).

Every figure is measured in the same run, on the same machine, beside its anchors:
reading the TCP source directly, and websockify relaying the same source.
"""
