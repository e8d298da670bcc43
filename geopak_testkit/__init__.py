"""Test doubles shared by the test suite and the benches: local fake HTTP APIs speaking each crawled service's
wire format. A package of its own so that ``bench/`` need not import from ``tests/``; never imported by the
pipeline or the model."""
