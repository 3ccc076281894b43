"""The model: MeftModel beside a base model, its tensor names and files, checkpoints, the dense
baselines, and loading base models."""
