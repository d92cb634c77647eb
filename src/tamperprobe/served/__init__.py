"""The served side: verify a model through what it answers.

``targets`` defines what verification talks to (``Target.query`` -> ``QueryResult``) and
``LocalTarget`` for a model in-process; ``clients`` holds one HTTP client per serving dialect;
``pool`` draws each endpoint run's markers and decoys fresh from the fingerprint, never one twice;
``verify`` compares the answers with a fingerprint and decides INTACT, TAMPERED or
INCONCLUSIVE; ``history`` records every run in SQLite, in the file whose ``ledger`` remembers
every query ever drawn (``_db`` opens it, checked, with bounded time); ``session`` is the one
flow every command drives (check, draw, query, compare, alarm, then record; ``hooks`` runs the
alarm hook); ``watch`` re-verifies on a schedule through it. The endpoint is the party under suspicion: ``untrusted``
makes its text inert before anything shows or stores it, and ``credentials`` keeps tokens off
the command line and secrets out of names, reports, history and hooks.
"""
