"""A Trainer subclass, models and a dataset that the ``trainer fit`` tests name in their configs."""
