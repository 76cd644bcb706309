"""Reliability and security: faults run through the poller, with what each left behind."""
