"""Tests that kill the mutants mutmut found alive in ``chatstate.flow._router``."""
