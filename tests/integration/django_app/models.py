"""The test app's one model."""

from __future__ import annotations

from django.db import models


class Note(models.Model):
    author = models.CharField(max_length=40)
    n = models.IntegerField()
    body = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = (models.UniqueConstraint(fields=["author", "n"], name="note_author_n"),)
