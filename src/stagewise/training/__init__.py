"""The backend-neutral stage runner: checkpoints, resume, runtime limits, history."""
