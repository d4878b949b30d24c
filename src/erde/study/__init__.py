"""Studies of many runs: the protocol (`reproduce`), grids, shards, parallel jobs, tuning."""
