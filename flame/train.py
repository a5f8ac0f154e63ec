"""``python -m flame.train``: the training command (upstream flame's entry point; train.sh runs it).

``python -m`` runs a module without binding it to its package, so this file stays an entry point that
nothing imports and ``flame.train`` stays the public training function; the command's code is
``flame.cli``. Importing this module would rebind ``flame.train`` to it, so it is refused.
"""

import sys

if __name__ != "__main__":
    raise ImportError(
        "flame.train is the command `python -m flame.train`; call flame.train(config) to train from Python "
        "and import flame.cli for the command's main()"
    )

from flame.cli import main

sys.exit(main())
