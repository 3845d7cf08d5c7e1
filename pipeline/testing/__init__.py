"""Helpers that start real local peers (a moto server process, the AQuA simulator) for tests, the demo
and the benchmarks. Nothing here patches botocore: everything is reached over HTTP on loopback."""
