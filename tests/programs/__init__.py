"""Child programs the tests run in second processes (``tests.support.run_program``)."""
