"""The harness of the tests (tests/) and benchmarks (bench/): imported by them, never by shufflefs."""
