"""A Django app for tests/integration/test_django.py; `run.py` is the project around it."""
