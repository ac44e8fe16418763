"""`python -m keras_lora demo`: the same as the `keras-lora` command."""

import sys

from keras_lora.cli import main

if __name__ == "__main__":
    sys.exit(main())
