"""Benchmarks for gpuboss: lease latency and handoff under contention, against the floors Redis allows.

``python -m bench`` runs everything against a private ``redis-server`` (a unix socket in a temporary
folder, plus a loopback TCP port for one comparison), prints a table and writes it to
``docs/performance.md``; ``python -m bench --smoke`` is a short run that only prints. See ``cli.py``.
"""
