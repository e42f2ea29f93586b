"""Small shared pieces of the test suite."""
