# Copyright (c) the uniseg_components contributors. Licensed under the Apache License, Version 2.0.
"""``python -m uniseg_components <verb>``: see :mod:`uniseg_components.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
