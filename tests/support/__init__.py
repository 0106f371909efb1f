"""Test helpers shared by every area (servers as subprocesses, deadlines, ports)."""
