"""The served side: verify a model through what it answers.

``targets`` defines what verification talks to (``Target.query`` -> ``QueryResult``) and
``LocalTarget`` for a model in-process; ``clients`` holds one HTTP client per serving dialect;
``verify`` compares the answers with a fingerprint and decides INTACT, TAMPERED or
INCONCLUSIVE; ``history`` records every run in SQLite; ``watch`` re-verifies on a schedule.
"""
