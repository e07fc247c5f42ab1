"""Sub-commands of the ``imsrelay`` CLI, one module per group (see ``imsrelay.cli``)."""
