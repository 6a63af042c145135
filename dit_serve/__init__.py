"""Shared core of dit-serve: settings, job records, queue operations, storage and the CLI.

Imported by both the API process and the workers, so it never imports torch or FastAPI.
"""
