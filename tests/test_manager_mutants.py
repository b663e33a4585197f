"""Tests that kill the mutants mutmut found alive in ``chatstate.state._manager``."""
