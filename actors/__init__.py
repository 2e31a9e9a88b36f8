"""Ray actors and the Ray Serve ingress (thin adapters over mars_ray): the Ray runtime issue."""
