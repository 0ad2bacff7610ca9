"""Tests of attention.bench, one file per module (a package, so that names like test_config
do not clash with tests/translation's)."""
