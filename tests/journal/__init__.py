"""Tests of the master target's retention journal, recovery points and retention volumes."""
