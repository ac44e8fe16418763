"""Side-by-side benchmarks of keras-lora; run `python benchmarks/run.py`."""
