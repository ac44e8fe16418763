"""One module per `keras-lora` command; see `keras_lora/cli.py`.

Each module imports only argparse-level things at the top: Keras and the
library are imported inside `run`, when the command runs.
"""
