"""Tests of the agent's NBD export and NBD client against real NBD peers."""
