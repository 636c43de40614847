"""``python -m smoothmix_tf.cli``: the ``smoothmix`` command."""

import sys

from smoothmix_tf.cli import main

sys.exit(main())
