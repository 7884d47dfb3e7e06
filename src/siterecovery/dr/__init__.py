"""Disaster-recovery rules and workflows."""
