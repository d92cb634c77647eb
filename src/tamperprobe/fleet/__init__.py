"""Verify a fleet: every deployed model checked from one process, each endpoint pinned to its fingerprint.

``config`` reads the fleet file (TOML); ``check`` runs one pass over every endpoint, concurrently.
"""
