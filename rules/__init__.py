"""The classification rule engine and the shipped rule set."""
