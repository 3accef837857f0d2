#!/usr/bin/env python3
"""A tiny Django project whose `manage.py test` is run directly and through tidemark
(crates/tidemark/tests/drivers.rs): the test runner creates a database, migrates it, runs the
tests from its connections and drops it — through tidemark as directly."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tmproject.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
