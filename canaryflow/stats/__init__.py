"""Statistics with no I/O: intervals and exact tests, estimators, anytime-valid sequential tests."""
