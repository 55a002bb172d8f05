"""The library behind the stages: data, models, training loops, tracking, report."""
