"""The local AQuA simulator (work in progress)."""
