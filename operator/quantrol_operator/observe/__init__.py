"""Reading the world for the planners: bounded I/O that turns what a cluster and its Prometheus say into the plain
values a pure planner takes. Nothing here decides; nothing here writes."""
