"""Measuring real runs: per rank, per component (the planner's keys), per phase; comparing
with the plan; calibrating the planner's constants."""
