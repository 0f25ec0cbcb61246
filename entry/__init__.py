"""What the entry points share (train.py, locate_values.py, train_predictor.py, python -m
bench): error reporting and run naming (run.py), the run summary and sweep report
(summary.py). Above every library package, below the entry points (docs/ARCHITECTURE.md)."""
