"""Helpers several suites (tests, bench) share: processes and proxies they start for themselves."""
