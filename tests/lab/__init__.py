"""Tests of the embedded lab: provider, CLI, guest workload and oracle."""
