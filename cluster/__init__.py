"""Ray cluster bring-up, placement groups and KV transfer: the Ray runtime issue."""
